"""The admin store: one schema for server and CLI.

``db`` opens it (URL masking, per-backend engines, transactions), ``tables`` defines it,
``migrate`` evolves and checks it, ``roles`` grants discountd's least-privilege role, and one
module per entity (``segments``, ``rules``, ``experiments``, ``model_versions``, ``clients``,
``audit``; ``events`` and ``offers``, which discountd writes) reads and writes it inside the
caller's transaction. ``snapshot`` reads it into the offer pipeline's Snapshot.
"""
