import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jmp_ext.data import format as fmt
from jmp_ext.data.format import DataError, decode_entry, encode_entry, validate_entry

from data_helpers import random_entry

dtypes = st.sampled_from([np.float64, np.float32, np.int64, np.int32, np.uint8, np.bool_])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3,
                                                                  min_side=0, max_side=5)))


@given(st.dictionaries(st.text(min_size=1, max_size=8), arrays, max_size=5))
def test_encode_decode_roundtrip(entry):
    decoded = decode_entry(encode_entry(entry))
    assert list(decoded) == list(entry)
    for name, array in entry.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


def test_decoded_arrays_are_writable_and_aligned():
    entry = decode_entry(encode_entry(random_entry(np.random.default_rng(0))))
    for array in entry.values():
        assert array.flags.writeable
        assert array.ctypes.data % array.dtype.alignment == 0


def test_corrupted_and_truncated_values_raise():
    value = encode_entry(random_entry(np.random.default_rng(1)))
    flipped = bytearray(value)
    flipped[len(value) // 2] ^= 0xFF
    with pytest.raises(DataError, match="checksum"):
        decode_entry(bytes(flipped))
    with pytest.raises(DataError, match="checksum"):
        decode_entry(value[:-9])
    with pytest.raises(DataError, match="truncated"):
        decode_entry(value[:10])
    with pytest.raises(DataError, match="allow-pickle"):
        decode_entry(b"\x80\x05" + value[2:])  # a pickle, not an entry


def test_object_arrays_are_refused():
    with pytest.raises(TypeError, match="numeric"):
        encode_entry({"x": np.array(["a", "b"], dtype=object)})


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("pos"), "missing field"),
    (lambda e: e.update(forces=e["forces"][:-1]), "forces has shape"),
    (lambda e: e.update(tags=e["tags"][:-1]), "tags has shape"),
    (lambda e: e.update(cell=np.zeros(3)), "cell has shape"),
    (lambda e: e["atomic_numbers"].__setitem__(0, 0), "unknown element with atomic number 0"),
    (lambda e: e["atomic_numbers"].__setitem__(0, 119), "unknown element with atomic number 119"),
    (lambda e: e.update(energy=np.float64(np.nan)), "label energy contains NaN"),
    (lambda e: e["forces"].__setitem__((0, 1), np.inf), "label forces contains NaN or inf"),
    (lambda e: e["pos"].__setitem__((0, 1), np.nan), "field pos contains NaN"),
    (lambda e: e.update(gap=np.zeros((2, 2))), "property gap must be a scalar or a vector"),
])
def test_validate_names_the_problem(change, message):
    entry = random_entry(np.random.default_rng(2), natoms=5)
    validate_entry(entry, "file.xyz entry 7")
    change(entry)
    with pytest.raises(DataError, match=f"file.xyz entry 7: .*{message}"):
        validate_entry(entry, "file.xyz entry 7")


def test_atoms_closer_than_any_two_atoms_can_be_are_refused():
    """A duplicated atom (on the same spot, or on another's periodic image: a site listed at
    fractional 0 and 1; the graphs would not pair them at all), one 0.05 Å from another, or one
    0.05 Å away through a periodic boundary; 0.5 Å apart passes."""
    cell = np.diag([6.0, 7.0, 8.0])

    def entry(pos, pbc=True):
        pos = np.asarray(pos, dtype=np.float64)
        return {"pos": pos, "atomic_numbers": np.full(len(pos), 6), "cell": cell if pbc else np.zeros((3, 3)),
                "pbc": np.full(3, pbc), "tags": np.zeros(len(pos), dtype=np.int64), "fixed": np.zeros(len(pos), bool)}

    base = [[0.02, 1.0, 1.0], [3.0, 3.0, 3.0], [1.5, 4.0, 6.0]]
    validate_entry(entry(base + [[1.5, 1.0, 1.0]]), "here")
    cases = [(base + [[3.0, 3.0, 3.0]], True, "atoms 1 and 3 are 0 Å apart"),
             (base + [[3.0, 3.0, 11.0]], True, "atoms 1 and 3 are 0 Å apart"),  # (on its image: z 3 + 8)
             (base + [[3.0, 3.05, 3.0]], False, "atoms 1 and 3 are 0.05 Å apart"),
             (base + [[5.99, 1.0, 1.04]], True, "atoms 0 and 3 are 0.05 Å apart")]
    for pos, pbc, message in cases:
        with pytest.raises(DataError, match=f"here: {message}, closer than any two atoms can be .*duplicated atom"):
            validate_entry(entry(pos, pbc), "here")
    validate_entry(entry(base + [[5.99, 1.0, 1.04]], pbc=False), "here")  # (no boundary to cross)


def test_normalize_entry_dtypes():
    entry = fmt.normalize_entry({"atomic_numbers": [1.0, 8.0], "pbc": [1, 0, 1], "energy": 1,
                                 "label": np.int32(3), "gap": 2.5}, "here", np.float32)
    assert entry["atomic_numbers"].dtype == np.int64
    assert entry["pbc"].dtype == bool
    # labels are floats even when given as ints; the energy stays float64 (float32 would round
    # a 1e4 eV total energy by 0.5 meV)
    assert entry["energy"].dtype == np.float64
    assert entry["label"].dtype == np.int64  # integer properties (classes) stay integers
    assert entry["gap"].dtype == np.float32
    with pytest.raises(DataError, match="here: atomic_numbers must hold integers"):
        fmt.normalize_entry({"atomic_numbers": [1.5]}, "here")
