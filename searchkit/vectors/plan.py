"""The choice of a vector index: a memory model of every kind, IVF-PQ parameters derived from N,
and `plan_index`, which picks a kind and its parameters under a memory budget. No FAISS here."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from ..errors import BudgetError, UsageError

KINDS = ("flat", "hnsw", "ivf-pq")
CHOICES = ("auto", *KINDS)
#: auto keeps exact search up to this many vectors (when it fits the budget)
EXACT_MAX = 1_000_000
#: IVF lists: nlist = ceil(4 sqrt(N)) (the issue's 4..16 sqrt(N) range, low end: cheaper
#: training and probing), trained on TRAIN_PER_LIST x nlist vectors (faiss' own minimum)
NLIST_PER_SQRT_N = 4
TRAIN_PER_LIST = 39
#: retrain an IVF index once it holds this many times the vectors it was trained on
RETRAIN_GROWTH = 4.0
#: rebuild an HNSW index once this share of its nodes are tombstones
TOMBSTONE_REBUILD = 0.25
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: fast-scan IVF-PQ packs the codes of each list in blocks of this many vectors (FAISS' bbs)
FASTSCAN_BLOCK = 32


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def default_budget() -> int:
    """Half of physical memory: the budget when none is given."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def check_choice(kind: str | None) -> str:
    kind = (kind or "auto").lower()
    if kind not in CHOICES:
        raise UsageError(f"unknown vector index '{kind}'; use one of: {', '.join(CHOICES)}")
    return kind


# -- memory model and the choice of an index ---------------------------------------------------
def flat_bytes(n: int, dim: int) -> int:
    return int(n * (2 * dim + 8 + 32))  # float16 vectors, id map, reverse id map (hash table)


def hnsw_bytes(n: int, dim: int, M: int = HNSW_M) -> int:
    # vectors + level-0 links (2M x int32) + upper levels (~1/M of the nodes) + id map, levels
    return int(n * (4 * dim + 8 * M * (1 + 1 / M) + 24))


def code_bytes(params: dict) -> int:
    """Bytes of one IVF-PQ code: m sub-quantizer indices of nbits each."""
    return math.ceil(int(params["m"]) * int(params.get("nbits", 8)) / 8)


def ivf_pq_bytes(n: int, dim: int, params: dict) -> int:
    """Resident bytes: centroids, code books, OPQ matrix, list headers, and the codes + ids
    unless they live on disk (memory-mapped: the page cache holds what queries touch).
    Fast-scan lists are stored in blocks of FASTSCAN_BLOCK codes: half a block per list more."""
    d_pq = params.get("d_pq", dim)
    fixed = params["nlist"] * (d_pq * 4 + 48) + (1 << params.get("nbits", 8)) * d_pq * 4
    if params.get("opq", True):
        fixed += dim * d_pq * 4
    if params.get("on_disk"):
        return int(fixed)
    padding = params["nlist"] * FASTSCAN_BLOCK // 2 * code_bytes(params) if params.get("fastscan") else 0
    return int(n * (code_bytes(params) + 8) + fixed + padding)


def estimate_bytes(kind: str, n: int, dim: int, params: dict | None = None) -> int:
    if kind == "flat":
        return flat_bytes(n, dim)
    if kind == "hnsw":
        return hnsw_bytes(n, dim, (params or {}).get("M", HNSW_M))
    return ivf_pq_bytes(n, dim, params or {})


def ivf_pq_params(n: int, dim: int, budget: int | None = None, *, on_disk: bool = False) -> dict | None:
    """IVF-PQ parameters derived from N (None when N is too small to train them): the most
    bytes per code (up to dim/8) that fit `budget`, or the fewest when none does. In memory
    a code of b bytes is 2b 4-bit fast-scan sub-quantizers; on disk, b 8-bit ones."""
    nlist = max(1, math.ceil(NLIST_PER_SQRT_N * math.sqrt(max(n, 1))))
    train = TRAIN_PER_LIST * nlist
    if n < max(train, TRAIN_PER_LIST * 256):
        return None
    d_pq = dim
    nbits, per_byte = (8, 1) if on_disk else (4, 2)
    best = max(1, d_pq // 8)
    sizes = [b for b in range(best, max(1, d_pq // 64) - 1, -1) if d_pq % (b * per_byte) == 0 and d_pq // (b * per_byte) <= 32]
    if not sizes:  # a dimension no code size divides evenly: plain 8-bit PQ
        nbits, per_byte, sizes = 8, 1, [m for m in range(best, 0, -1) if d_pq % m == 0][:1] or [1]
    params = {}
    for b in sizes:
        params = {"nlist": nlist, "m": b * per_byte, "nbits": nbits, "fastscan": nbits == 4, "opq": "auto", "d_pq": d_pq, "train_size": train}
        if on_disk:
            params["on_disk"] = True
        if budget is None or ivf_pq_bytes(n, dim, params) <= budget:
            break
    return params


def ivf_pq_min_count(dim: int) -> int:
    """The fewest vectors an automatically sized IVF-PQ index can be trained on."""
    n = TRAIN_PER_LIST * 256
    while ivf_pq_params(n, dim) is None:
        n = int(n * 1.05) + 1
    return n


@dataclass
class Plan:
    """The vector index to build: kind, parameters, estimated resident memory, and why."""

    kind: str
    params: dict
    memory: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan_index(n: int, dim: int, requested: str = "auto", budget: int | None = None) -> Plan:
    """Choose the vector index for `n` vectors of `dim` under a memory budget (bytes; None =
    half of physical memory).

    auto: flat while N <= EXACT_MAX and it fits; beyond, HNSW when it fits, else IVF-PQ.
    A kind asked for explicitly is built as asked, except IVF-PQ on too few vectors to train,
    which stays flat until there are enough. Raises BudgetError, naming the smallest budget
    that would work, when nothing fits.
    """
    requested = check_choice(requested)
    limit = default_budget() if budget is None else int(budget)
    ivf = ivf_pq_params(n, dim, limit)
    ivf_min = ivf_pq_params(n, dim, 0)
    options: list[Plan] = []  # in order of preference
    minimal: list[int] = []
    flat = Plan("flat", {}, flat_bytes(n, dim), "exact search")
    if requested == "flat":
        options.append(flat)
    elif requested == "hnsw":
        options.append(Plan("hnsw", {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}, hnsw_bytes(n, dim), "requested"))
    elif requested == "ivf-pq":
        if ivf is None:
            flat.reason = f"ivf-pq requested, but it needs at least {ivf_pq_min_count(dim):,} vectors to train; exact until then"
            options.append(flat)
        else:
            options.append(Plan("ivf-pq", ivf, ivf_pq_bytes(n, dim, ivf), "requested"))
    else:
        if n <= EXACT_MAX:
            flat.reason = f"auto: exact search up to {EXACT_MAX:,} vectors"
            options.append(flat)
        else:
            options.append(
                Plan("hnsw", {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}, hnsw_bytes(n, dim),
                     f"auto: more than {EXACT_MAX:,} vectors and HNSW fits the memory budget")
            )
        if ivf is not None:
            why = "auto: the faster kinds do not fit the memory budget"
            options.append(Plan("ivf-pq", ivf, ivf_pq_bytes(n, dim, ivf), why))
    if requested in ("auto", "ivf-pq") and ivf is not None:
        # last resort: the codes on disk, memory-mapped (as many bytes per code as in RAM at best)
        disk = ivf_pq_params(n, dim, None, on_disk=True)
        options.append(Plan("ivf-pq", disk, ivf_pq_bytes(n, dim, disk), "codes on disk (memory-mapped): the in-memory kinds do not fit the memory budget"))
    for p in options:
        if p.memory <= limit:
            return p
    for p in options:
        if p.kind == "ivf-pq" and ivf_min:  # the fewest bytes per code, in RAM or on disk
            smallest = ivf_pq_params(n, dim, 0, on_disk=True) if p.params.get("on_disk") else ivf_min
            minimal.append(ivf_pq_bytes(n, dim, smallest))
        else:
            minimal.append(p.memory)
    need = min(minimal)
    raise BudgetError(
        f"no {'vector index' if requested == 'auto' else requested + ' index'} of {n:,} vectors of dimension {dim} "
        f"fits in {format_bytes(limit)}; the smallest budget that works is {format_bytes(need)} "
        f"(--max-memory {math.ceil(need / 1024**2)}M)",
        min_bytes=need,
    )

