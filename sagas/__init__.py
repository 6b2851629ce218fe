"""Saga definitions: the order saga (order.py) and the large order (large_order.py), a
parallel group and a manager's approval. Load them with ``--sagas
sagas.order,sagas.large_order``."""
