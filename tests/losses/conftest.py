from tests.model.conftest import one_thread  # noqa: F401  (autouse: one intra-op thread for small tensors)
