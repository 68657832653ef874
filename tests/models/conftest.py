from jmp_fixtures import one_torch_thread  # noqa: F401  (autouse fixture for every model test)
