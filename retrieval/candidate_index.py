"""Nearest-item search over a loaded index artifact, with exclusions and metadata rules.

Tombstoned items (retired by an incremental update) and items a request's metadata rules
(allow / block by category, tag, ...) refuse are filtered inside Faiss with an ID selector,
so they are never returned and never count against k. A request's excluded ids (its
exclude_item_ids, and with exclude_seen its user's seen set) are dropped so that k
candidates come back whenever the index has them: up to ``SHARED_EXCLUSIONS`` of them that
the index holds, by over-fetching by that many in the batch's shared Faiss call and
filtering after; more (a seen set of thousands), inside a Faiss call of the request's own
with an ID selector that also refuses them (HNSW as deep as k + the exclusions, since it
walks past refused items), refilled by a deeper search, then an exact scan of what is left
when few items are, in the rare case that it comes back short.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.artifact import METADATA, IndexArtifact, load_metadata_rows
from indexer.build import search_parameters, tunable_parameter
from contracts.errors import InvalidArgument
from retrieval import mapped_cache
from retrieval.query import ItemRules, rule_field
from retrieval.row_lookup import IdRows
from retrieval.wire import CandidateWire


@dataclass(frozen=True, slots=True)
class Candidates:
    """Up to k results of one query, best first, as rows of the searched index's table."""

    rows: np.ndarray          # int64 [m]: labels = rows of index.item_ids
    score_array: np.ndarray   # float32 [m]: the index metric's scores
    index: CandidateIndex

    @property
    def item_ids(self) -> list[str]:
        return self.index.item_ids[self.rows].tolist()

    @property
    def scores(self) -> list[float]:
        return self.score_array.tolist()

    def top(self, k: int) -> Candidates:
        return Candidates(self.rows[:k], self.score_array[:k], self.index)

    def wire(self) -> bytes:
        """The serialised ``candidates`` field of a reply (retrieval.wire)."""
        return self.index.wire.records(self.rows, self.score_array)


class CandidateIndex:
    def __init__(self, artifact: IndexArtifact) -> None:
        self.artifact = artifact
        self.item_ids = artifact.item_ids
        live = np.ones(len(artifact.item_ids), dtype=bool)
        live[artifact.tombstones] = False
        live_rows = np.flatnonzero(live)
        files = artifact.manifest.get("files", {})
        # cache keys (retrieval.mapped_cache): the checksums of the files the tables come from
        ids_key = f"index-{str(files['item_ids.npy'])[:32]}" if "item_ids.npy" in files else None
        key = (f"{ids_key}-{str(files.get('tombstones.npy', 'none'))[:16]}"
               if ids_key is not None else None)
        self._row_of = IdRows.cached(key, lambda: (artifact.item_ids[live_rows], live_rows))
        self._live = live
        self._selector = _without(artifact.tombstones)
        self._graph = tunable_parameter(artifact.index) == "ef_search"  # HNSW
        # fetch_k → Faiss search parameters with self._selector: read-only once made, so
        # shared by every search. Made per search (a downcast and a SWIG object) they took
        # 5 µs alone and about 47 µs a one-user batch in the server (py-spy samples of the
        # batch thread at c=1, 1M items; cold caches, most likely)
        self._params: dict[int, faiss.SearchParameters | None] = {}
        self._rows_by_value = _metadata_rows(artifact)
        self.wire = CandidateWire(artifact.item_ids, ids_key)

    @property
    def size(self) -> int:
        return len(self._row_of)

    def vector(self, item_id: str) -> np.ndarray | None:
        """The indexed vector [d] of a live item (None when the index does not hold it).
        IVF indexes get a direct map on first use (8 bytes per item) so that stored codes
        can be decoded; it is built in the compute thread, which also runs every search."""
        row = self._row_of.get(item_id)
        if row is None:
            return None
        try:
            return self.artifact.index.reconstruct(int(row))
        except RuntimeError:  # IVF without a direct map yet
            faiss.extract_index_ivf(self.artifact.index).make_direct_map()
            return self.artifact.index.reconstruct(int(row))

    @property
    def metadata_columns(self) -> tuple[str, ...]:
        return tuple(sorted(self._rows_by_value))

    def check_rules(self, rules: ItemRules) -> None:
        """InvalidArgument naming a rule on a column the index has no metadata for."""
        for name, columns in (("allow", rules.allow), ("block", rules.block)):
            for column in columns:
                if column not in self._rows_by_value:
                    raise InvalidArgument(rule_field(name, column), "unknown item metadata column; "
                                          f"the index has: {', '.join(self.metadata_columns) or '(none)'}")

    def search(self, user_emb: np.ndarray, k: int, exclude: Iterable[frozenset[str]],
               rules: list[ItemRules] | None = None) -> list[Candidates]:
        """user_emb [n, d] float32; one exclusion set (and optional rules) per row → n
        candidate lists of ≤ k. Rows with the same rules share one Faiss call."""
        exclude = list(exclude)
        rules = rules or [ItemRules({}, {})] * len(exclude)
        out: list[Candidates | None] = [None] * len(exclude)
        groups: dict[tuple, list[int]] = {}
        for row, rule in enumerate(rules):
            groups.setdefault(rule.key(), []).append(row)
        for rows in groups.values():
            found = self._search(user_emb[rows], k, [exclude[r] for r in rows], rules[rows[0]])
            for r, candidates in zip(rows, found, strict=True):
                out[r] = candidates
        return out

    def _search(self, user_emb: np.ndarray, k: int, exclude: list[frozenset[str]],
                rules: ItemRules) -> list[Candidates]:
        excluded_rows = [self._rows(ids) for ids in exclude]
        selector, allowed = self._selector, self._live
        if rules:
            allowed = self._allowed(rules)
            selector = _only(allowed)
        eligible = int(allowed.sum()) if rules else self.size
        out: list[Candidates | None] = [None] * len(excluded_rows)
        shared = [i for i, ex in enumerate(excluded_rows) if len(ex) <= SHARED_EXCLUSIONS]
        if shared:
            found = self._search_shared(user_emb[shared], k, [excluded_rows[i] for i in shared],
                                        selector, eligible)
            for i, candidates in zip(shared, found, strict=True):
                out[i] = candidates
        for i, excluded in enumerate(excluded_rows):
            if out[i] is None:
                out[i] = self._search_alone(user_emb[i : i + 1], k, excluded, selector,
                                            allowed, eligible)
        return out  # type: ignore[return-value]

    def _search_shared(self, user_emb: np.ndarray, k: int, excluded_rows: list[np.ndarray],
                       selector: faiss.IDSelector | None, eligible: int) -> list[Candidates]:
        """One Faiss call for the rows, over-fetching by the most exclusions of one row."""
        fetch_k = min(eligible, k + max((len(r) for r in excluded_rows), default=0))
        if fetch_k == 0:
            return [self._keep(_NO_SCORES, _NO_ROWS, _NO_ROWS, k) for _ in excluded_rows]
        scores, rows = self._faiss_search(user_emb, fetch_k, selector)
        return [self._keep(s, r, ex, k) for s, r, ex in zip(scores, rows, excluded_rows, strict=True)]

    def _search_alone(self, user_emb: np.ndarray, k: int, excluded: np.ndarray,
                      selector: faiss.IDSelector | None, allowed: np.ndarray, eligible: int
                      ) -> Candidates:
        """user_emb [1, d] with its excluded rows refused inside Faiss. HNSW meets the
        refused items on its way and must look past them, so it searches as deep as k + the
        exclusions (efSearch follows); an IVF index scans its lists whatever k is, and goes
        that deep only when it comes back short. Still short with few items left (HNSW's
        graph cut up by the exclusions): exact search over what is left."""
        left = eligible - int(allowed[excluded].sum())
        want, deep = min(k, left), min(eligible, k + len(excluded))
        if want <= 0:
            return self._keep(_NO_SCORES, _NO_ROWS, _NO_ROWS, k)
        refusing = _and_not(selector, excluded)
        fetch = deep if self._graph else want
        scores, rows = self._faiss_search(user_emb, fetch, refusing)
        if int((rows[0] >= 0).sum()) < want and fetch < deep:
            scores, rows = self._faiss_search(user_emb, deep, refusing)
        if int((rows[0] >= 0).sum()) < want and left <= EXACT_FALLBACK:
            scores, rows = self._exact(user_emb, allowed, excluded, k)
        return self._keep(scores[0], rows[0], _NO_ROWS, k)

    def _exact(self, user_emb: np.ndarray, allowed: np.ndarray, excluded: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the allowed, not excluded rows by the index's own metric, from
        the vectors it stores; [1, k] like a Faiss search."""
        keep = allowed.copy()
        keep[excluded] = False
        rows = np.flatnonzero(keep)
        xb = self._stored_vectors(rows)
        if self.artifact.index.metric_type == faiss.METRIC_INNER_PRODUCT:
            scores = xb @ user_emb[0]
            order = np.argsort(-scores, kind="stable")[:k]
        else:
            scores = ((xb - user_emb[0]) ** 2).sum(axis=1)
            order = np.argsort(scores, kind="stable")[:k]
        return scores[order][None].astype(np.float32), rows[order][None]

    def _stored_vectors(self, rows: np.ndarray) -> np.ndarray:
        index = self.artifact.index
        try:
            return index.reconstruct_batch(rows)
        except RuntimeError:  # IVF without a direct map yet (see vector)
            faiss.extract_index_ivf(index).make_direct_map()
            return index.reconstruct_batch(rows)

    def _faiss_search(self, user_emb: np.ndarray, fetch_k: int,
                      selector: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        index = self.artifact.index
        if selector is self._selector:  # the common case: made once per fetch_k
            params = self._params.get(fetch_k, _UNMADE)
            if params is _UNMADE:
                if len(self._params) >= MAX_CACHED_PARAMS:
                    self._params.clear()
                params = self._params[fetch_k] = search_parameters(
                    index, self.artifact.spec, fetch_k, selector)
        else:
            params = search_parameters(index, self.artifact.spec, fetch_k, selector)
        _threads_for(len(user_emb))
        return index.search(np.ascontiguousarray(user_emb, dtype=np.float32), fetch_k,
                            params=params)

    def _allowed(self, rules: ItemRules) -> np.ndarray:
        """bool [n_rows]: live items every allow rule accepts and no block rule refuses."""
        allowed = self._live.copy()
        for column, values in rules.allow.items():
            allowed &= self._matching(column, values)
        for column, values in rules.block.items():
            allowed &= ~self._matching(column, values)
        return allowed

    def _matching(self, column: str, values: frozenset[str]) -> np.ndarray:
        mask = np.zeros(len(self.item_ids), dtype=bool)
        by_value = self._rows_by_value[column]
        for value in values:
            mask[by_value.get(value, [])] = True
        return mask

    def _rows(self, item_ids: frozenset[str]) -> np.ndarray:
        """int64 rows of the ids the index holds (others are ignored)."""
        if not item_ids:
            return _NO_ROWS
        rows = self._row_of.rows(list(item_ids))
        return rows[rows >= 0]

    def _keep(self, scores: np.ndarray, rows: np.ndarray, excluded: np.ndarray,
              k: int) -> Candidates:
        """The first k found rows that are real (Faiss pads with -1) and not excluded."""
        ok = rows >= 0
        if len(excluded):
            ok &= ~np.isin(rows, excluded)
        if ok.all():
            return Candidates(rows[:k], scores[:k], self)
        keep = np.flatnonzero(ok)[:k]
        return Candidates(rows[keep], scores[keep], self)


def _metadata_rows(artifact: IndexArtifact) -> dict[str, dict[str, np.ndarray]]:
    """``load_metadata_rows``, kept in the cache of retrieval.mapped_cache under the metadata
    file's checksum and mapped from there (about 22 MB at 1M items with a tag list): the
    workers of ``serve --workers`` share one copy."""
    checksum = artifact.manifest.get("files", {}).get(METADATA)
    if checksum is None:
        return load_metadata_rows(artifact)

    def check(arrays: dict[str, np.ndarray]) -> None:
        _unflatten(arrays, len(artifact.item_ids))

    arrays = mapped_cache.mapped_arrays("metadata-rows", f"index-{str(checksum)[:32]}",
                                        lambda: _flatten(load_metadata_rows(artifact)), check)
    return _unflatten(arrays, len(artifact.item_ids))


def _flatten(rows_by_value: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """column → value → rows as arrays: "names" (UTF-8 JSON of [[column, [value, …]], …]),
    and per column i "i-rows" (every value's rows, back to back) and "i-starts" (where each
    value's rows begin, and the end)."""
    names = [[column, list(by_value)] for column, by_value in rows_by_value.items()]
    out = {"names": np.frombuffer(json.dumps(names).encode(), dtype=np.uint8)}
    for i, by_value in enumerate(rows_by_value.values()):
        groups = [np.asarray(g, dtype=np.int64) for g in by_value.values()]
        out[f"{i}-starts"] = np.concatenate([[0], np.cumsum([len(g) for g in groups])]
                                            ).astype(np.int64)
        out[f"{i}-rows"] = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    return out


def _unflatten(arrays: dict[str, np.ndarray], n_rows: int) -> dict[str, dict[str, np.ndarray]]:
    """``_flatten``'s inverse (views of its arrays); ValueError for arrays it did not make."""
    try:
        names = json.loads(arrays["names"].tobytes())
        out = {}
        for i, (column, values) in enumerate(names):
            starts, rows = arrays[f"{i}-starts"], arrays[f"{i}-rows"]
            if (starts.shape != (len(values) + 1,) or rows.ndim != 1 or starts[0] != 0
                    or starts.dtype != np.int64 or rows.dtype != np.int64
                    or starts[-1] != len(rows) or np.any(np.diff(starts) < 0)
                    or (len(rows) and not 0 <= rows.min() <= rows.max() < n_rows)):
                raise ValueError(f"column {column!r}: rows that do not fit")
            out[str(column)] = {str(v): rows[a:b] for v, a, b in
                                zip(values, starts[:-1].tolist(), starts[1:].tolist(), strict=True)}
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not metadata rows: {exc!r}") from exc
    return out


SHARED_EXCLUSIONS = 256  # over-fetching by more costs the whole batch a deeper search
EXACT_FALLBACK = 20_000  # items left at most for an exact scan when the index came back short
MAX_CACHED_PARAMS = 64  # distinct fetch_k (k + a batch's most exclusions) kept at once
_UNMADE = object()
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)

# Queries in one Faiss call from which a second OpenMP thread is woken for it. With
# OMP_WAIT_POLICY=passive (serve sets it) a woken thread pays a futex wake-up: measured on
# the 1M-item IVF4096,SQ8 at nprobe 96, one thread against two, ms a call (CPU / wall):
# 2 queries 0.66/0.68 against 0.76/0.73, 3 0.96/0.97 against 1.08/1.08, 4 1.26/1.27
# against 1.43/1.00, 8 2.54/2.55 against 2.50/1.48. Half-load batches are of 1-3.
PARALLEL_QUERIES = 4
_omp = threading.local()  # omp_set_num_threads is per calling thread, and so is this


def use_search_threads(n: int) -> None:
    """The OpenMP threads this thread's searches may use: every search of at least
    PARALLEL_QUERIES queries gets ``n``, a smaller one one thread."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"search threads must be an integer >= 1 (got {n!r})")
    faiss.omp_set_num_threads(n)
    _omp.most = _omp.now = n


def _threads_for(queries: int) -> None:
    most = getattr(_omp, "most", 1)
    if most > 1:
        wanted = most if queries >= PARALLEL_QUERIES else 1
        if wanted != _omp.now:
            faiss.omp_set_num_threads(wanted)
            _omp.now = wanted


def _without(labels: np.ndarray) -> faiss.IDSelector | None:
    """A selector accepting every label except ``labels`` (None when there are none)."""
    if len(labels) == 0:
        return None
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64))
    selector = faiss.IDSelectorNot(batch)
    selector.referenced = batch  # the C++ object holds a raw pointer: keep it alive
    return selector


def _and_not(selector: faiss.IDSelector | None, labels: np.ndarray) -> faiss.IDSelector:
    """``selector`` (None: every label) that also refuses ``labels``."""
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64))
    refusing = faiss.IDSelectorNot(batch)
    refusing.referenced = batch  # the C++ objects hold raw pointers: keep them alive
    if selector is None:
        return refusing
    both = faiss.IDSelectorAnd(selector, refusing)
    both.referenced = (selector, refusing)
    return both


def _only(allowed: np.ndarray) -> faiss.IDSelector:
    """A selector accepting exactly the rows where ``allowed`` is True."""
    bitmap = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
    selector.referenced = bitmap  # the C++ object holds a raw pointer: keep it alive
    return selector
