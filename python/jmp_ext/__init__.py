"""jmp_ext: fast, dependable pre-training and fine-tuning of JMP (GemNet-OC) models.

Layout:
    jmp_ext.ops       custom torch ops around the C++/CUDA kernels of csrc/
                      (radius graph, triplet/quadruplet indices, reductions)
    jmp_ext.models    GemNet-OC as JMP uses it, heads, checkpoint loading
    jmp_ext.data      LMDB datasets, converters, statistics, samplers, demo data
    jmp_ext.train     the training job (python -m jmp_ext.train)
"""

__version__ = "0.1.0"
