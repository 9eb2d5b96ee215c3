"""The benchmark scripts' docs writer; it lives in the package (``nnunet-te bench`` uses it too)."""

from nnunet_te.bench.docs import write_section  # noqa: F401
