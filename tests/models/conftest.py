import pytest


@pytest.fixture(autouse=True, scope="module")
def _every_model_test_on_one_thread(one_torch_thread):
    yield
