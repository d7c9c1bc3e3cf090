"""Global-memory bytes that Triton kernels move, counted under the interpreter (``TRITON_INTERPRET=1``).

On a CPU nothing can be timed meaningfully, but a memory-bound kernel's plan can be checked exactly: a one-pass
kernel loads every input byte once and stores every output byte once. The interpreter executes each
``tl.load`` / ``tl.store`` / ``tl.atomic_*`` through methods of ``triton.runtime.interpreter.InterpreterBuilder``
with numpy arrays of addresses and masks; :class:`Traffic` wraps those methods for the duration of a ``with``
block and records the addresses the mask lets through::

    with Traffic() as t:
        out = rk.label_map(x, mapping, backend="triton")
    assert t.stored_unique == out.numel() * 4

``loaded`` / ``stored``: bytes every access asked for (an address read twice counts twice).
``loaded_unique`` / ``stored_unique``: bytes at distinct addresses (what DRAM must move at least once).
:meth:`Traffic.bytes_in` restricts both to one tensor's storage. An atomic counts as a load and a store.
Programs run one after another in the interpreter, so nothing here says anything about timing or races.
"""

from __future__ import annotations

import numpy as np

# Each recorded access is kept as address * TAG + element size, so distinct (address, size) pairs stay
# distinct and the byte count of a set of accesses is the sum of the tags modulo TAG. Elements are <= 8 bytes.
TAG = np.uint64(16)


def _element_size(ptrs) -> int:
    from triton.runtime.interpreter import _get_np_dtype

    return np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize


def _tagged(ptrs, mask) -> np.ndarray:
    """The active lanes' addresses of one access, tagged with the element size."""
    addr = np.asarray(ptrs.data)
    active = np.ones(addr.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask.data), addr.shape)
    return addr[active].astype(np.uint64) * TAG + np.uint64(_element_size(ptrs))


def _bytes(tagged: np.ndarray) -> int:
    return int((tagged % TAG).sum())


class Traffic:
    """Context manager counting the bytes Triton kernels load and store while it is active (interpreter only)."""

    def __init__(self) -> None:
        self.loads = 0  # number of load instructions executed (one per program per tl.load)
        self.stores = 0
        # tagged addresses per access, in execution order (tests may inspect them: see bytes_in)
        self._load_addrs: list[np.ndarray] = []
        self._store_addrs: list[np.ndarray] = []
        self._originals: dict[str, object] = {}

    # -- results -------------------------------------------------------------------------------------------------

    @property
    def loaded(self) -> int:
        return sum(_bytes(a) for a in self._load_addrs)

    @property
    def stored(self) -> int:
        return sum(_bytes(a) for a in self._store_addrs)

    @property
    def loaded_unique(self) -> int:
        return self._unique(self._load_addrs)

    @property
    def stored_unique(self) -> int:
        return self._unique(self._store_addrs)

    @staticmethod
    def _unique(chunks: list[np.ndarray]) -> int:
        return _bytes(np.unique(np.concatenate(chunks))) if chunks else 0

    def bytes_in(self, tensor, kind: str = "load") -> tuple[int, int]:
        """(bytes, distinct bytes) of the loads (``kind="load"``) or stores that fall inside ``tensor``'s storage."""
        if kind not in ("load", "store"):
            raise ValueError(f"kind: expected 'load' or 'store', got {kind!r}")
        chunks = self._load_addrs if kind == "load" else self._store_addrs
        if not chunks:
            return 0, 0
        tagged = np.concatenate(chunks)
        addr = tagged // TAG
        lo = tensor.untyped_storage().data_ptr()
        inside = tagged[(addr >= lo) & (addr < lo + tensor.untyped_storage().nbytes())]
        return _bytes(inside), _bytes(np.unique(inside))

    def summary(self) -> str:
        lu, su = self.loaded_unique, self.stored_unique
        return (f"loaded {self.loaded:,} B ({lu:,} distinct, x{self.loaded / max(lu, 1):.2f}) in {self.loads} loads; "
                f"stored {self.stored:,} B ({su:,} distinct) in {self.stores} stores")

    # -- recording -----------------------------------------------------------------------------------------------

    def _record(self, kind: str, ptrs, mask) -> None:
        if kind == "load":
            self.loads += 1
            self._load_addrs.append(_tagged(ptrs, mask))
        else:
            self.stores += 1
            self._store_addrs.append(_tagged(ptrs, mask))

    def __enter__(self) -> Traffic:
        from triton.runtime.interpreter import InterpreterBuilder as B

        if self._originals:
            raise RuntimeError("Traffic: this counter is already active (use a new Traffic() per with block)")
        me = self
        orig = self._originals = {name: getattr(B, name) for name in
                                  ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                   "create_atomic_cas")}

        # create_load / create_store / create_atomic_load / create_atomic_store all end in the masked versions,
        # so wrapping these four sees every access exactly once.
        def masked_load(builder, ptrs, mask, *args, **kwargs):
            me._record("load", ptrs, mask)
            return orig["create_masked_load"](builder, ptrs, mask, *args, **kwargs)

        def masked_store(builder, ptrs, value, mask, *args, **kwargs):
            me._record("store", ptrs, mask)
            return orig["create_masked_store"](builder, ptrs, value, mask, *args, **kwargs)

        def atomic_rmw(builder, op, ptr, val, mask, *args, **kwargs):
            me._record("load", ptr, mask)
            me._record("store", ptr, mask)
            return orig["create_atomic_rmw"](builder, op, ptr, val, mask, *args, **kwargs)

        def atomic_cas(builder, ptr, cmp, val, *args, **kwargs):
            me._record("load", ptr, None)
            me._record("store", ptr, None)
            return orig["create_atomic_cas"](builder, ptr, cmp, val, *args, **kwargs)

        B.create_masked_load, B.create_masked_store = masked_load, masked_store
        B.create_atomic_rmw, B.create_atomic_cas = atomic_rmw, atomic_cas
        return self

    def __exit__(self, *exc) -> bool:
        from triton.runtime.interpreter import InterpreterBuilder as B

        for name, fn in self._originals.items():
            setattr(B, name, fn)
        self._originals = {}
        return False
