"""The naive baseline, pinned: one SavedModel user-tower call and one Faiss search per
request, in a worker thread, with no batching and no NumPy tower.

This is the request path `two-tower serve` had before its optimisation; it is kept here,
built from the same parts (validation, feature store, SavedModel tower, index, proto
encoding), so the load test can compare the optimised server with it in one run after
retrieval/ has moved on. A renamed part fails here loudly rather than changing what this
baseline measures.

    python -m benchmarks.naive_server --model M --index I [--features D | --redis-url URL]
        --port 0 --port-file /tmp/port
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from indexer.artifact import load_index_artifact
from retrieval.candidate_index import CandidateIndex, Candidates
from retrieval.errors import status_of
from retrieval.feature_store import (
    FeatureStore, InMemoryFeatureStore, RedisFeatureStore, users_from_dataset,
)
from training.saved_model_tower import SavedModelUserTower
from retrieval.query import Limits, validate_query
from retrieval.servicer import decode_retrieve
from retrieval.signals import stop_signalled
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as pb_grpc
from contracts.model_manifest import ModelManifest, load_model_manifest
from contracts.errors import ArtifactError
from contracts.inputs import UserRequest, user_inputs

log = logging.getLogger(__name__)
HISTORY_LENGTH = 20


class NaiveServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, model: ModelManifest, tower: SavedModelUserTower, index: CandidateIndex,
                 store: FeatureStore) -> None:
        self.model, self.tower, self.index, self.store = model, tower, index, store
        self.limits = Limits()

    async def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        try:
            return await self._retrieve(request)
        except Exception as exc:  # noqa: BLE001 - the one boundary of this server
            status = status_of(exc)
            if status is None:
                log.exception("internal error (request_id %s)", request.request_id)
                status = (grpc.StatusCode.INTERNAL, "internal error")
        await context.abort(*status)

    async def _retrieve(self, request: pb.RetrieveRequest) -> pb.RetrieveResponse:
        query = decode_retrieve(request)
        validate_query(query, self.model.feature_spec, self.limits)
        stored = await self.store.get_user(query.user_id)
        user = UserRequest(user_id=query.user_id, features=stored.features if stored else {},
                           history=query.recent_item_ids or (stored.history if stored else ()),
                           context=query.context, event_time=query.event_time)
        candidates = await asyncio.to_thread(self.embed_and_search, user, query.k,
                                             query.exclude_item_ids)
        return pb.RetrieveResponse(
            candidates=[pb.Candidate(item_id=i, score=s)
                        for i, s in zip(candidates.item_ids, candidates.scores, strict=True)],
            model_version=self.model.model_version,
            index_version=self.index.artifact.index_version, request_id=query.request_id)

    def embed_and_search(self, user: UserRequest, k: int, exclude: frozenset[str]) -> Candidates:
        user_emb = self.tower(user_inputs(self.model.feature_spec, [user]))  # [1, d] float32
        return self.index.search(user_emb, k, [exclude])[0]


async def _store(features: Path | None, redis_url: str | None) -> FeatureStore:
    if redis_url:
        return RedisFeatureStore.from_url(redis_url, history_length=HISTORY_LENGTH)
    store = InMemoryFeatureStore(history_length=HISTORY_LENGTH)
    if features is not None:
        from contracts.dataset import load_dataset

        dataset = await asyncio.to_thread(load_dataset, features)
        await store.put_users(users_from_dataset(dataset, HISTORY_LENGTH))
    return store


def _load(model_dir: Path, index_dir: Path) -> tuple[ModelManifest, SavedModelUserTower,
                                                     CandidateIndex]:
    model = load_model_manifest(model_dir)
    artifact = load_index_artifact(index_dir)
    if artifact.model_version != model.model_version:
        raise ArtifactError(str(index_dir / "manifest.json"),
                            f"index was built from model {artifact.model_version!r} but the "
                            f"model to serve is {model.model_version!r}")
    return model, SavedModelUserTower(model), CandidateIndex(artifact)


async def serve(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    model, tower, index = await asyncio.to_thread(_load, args.model, args.index)
    servicer = NaiveServicer(model, tower, index, await _store(args.features, args.redis_url))
    await asyncio.to_thread(servicer.embed_and_search, UserRequest("", {}, (), {}, 0), 1,
                            frozenset())  # warm-up: the first measured call is not the slowest
    server = grpc.aio.server()
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise OSError(f"cannot bind {args.host}:{args.port}")
    await server.start()
    log.info("naive server: model %s, index %s on %s:%d", model.model_version,
             index.artifact.index_version, args.host, port)
    if args.port_file is not None:
        args.port_file.write_text(str(port))
    await stop_signalled()
    await server.stop(2.0)
    await servicer.store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--features", type=Path, help="dataset dir for the in-process store")
    p.add_argument("--redis-url", help="read user features from Redis instead")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50053, help="0 = any free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--cpus", metavar="LIST",
                   help="run every thread on these CPUs (e.g. 0 or 0-1), as serve --cpu-affinity")
    args = p.parse_args(argv)
    if args.cpus:
        from retrieval.cpus import parse_cpu_list, pin_process

        pin_process(parse_cpu_list(args.cpus))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
