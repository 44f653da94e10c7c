"""The admin store: one schema for server and CLI.

``db`` opens it (URL masking, per-backend engines, transactions), ``tables`` defines it,
``migrate`` evolves and checks it, and one repository per entity (``segments``, ``rules``,
``experiments``, ``model_versions``, ``audit``) reads and writes it inside the caller's
transaction.
"""
