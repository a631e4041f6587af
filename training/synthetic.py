"""A seeded synthetic dataset with structure a two-tower model can learn.

The generative story:

* ``num_clusters`` taste clusters. Every item belongs to one; its ``category`` says which
  with probability ``category_purity`` (otherwise a random category), and its ``tags`` are
  drawn mostly from tags of its cluster.
* Item popularity is Zipf-skewed within each cluster.
* Every user has a *day* cluster and a *night* cluster. Odd-numbered clusters are
  "night" clusters: between 20:00 and 04:59 UTC a user watches from their night cluster,
  otherwise from their day cluster (with probability ``taste_strength``; else any item by
  popularity). So the hour of day is needed to predict what comes next.
* Demographics follow the day cluster: ``age`` and ``country`` lean by cluster, so a
  cold-start user with features is better than a coin; ``device`` leans to "tv" at night.
* A user never interacts twice with the same item; timestamps span ``days`` days.
* Optionally (``order_strength`` > 0) users have order: with that probability an event
  after a user's first is drawn, by popularity, from the cluster that follows the cluster
  of the user's previous item in a fixed cycle over all clusters (a Markov chain over
  clusters, ``next_clusters``); otherwise as above. A bag of the user's items cannot tell
  which one came last; a sequence model can. Drawn from the same stream, so a dataset
  with ``order_strength`` 0 is the one without the option.
* Optionally (``content_dims`` > 0) every item also has a dense content vector, numeric
  features ``content0`` … ``content{d-1}`` (what a text or image encoder would give a real
  catalogue): its cluster's centre plus noise ``CONTENT_NOISE`` times the spread of the
  centres. Items that no user touched then still differ from each other through their
  features, as they do in a real catalogue, instead of tying on category and tags. It is
  drawn from its own seeded stream, so the rest of the dataset is the same with or without.

Recall on this data means something: a popularity ranking ignores the clusters and the
context and scores far below a model that learned them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contracts.dataset import Dataset
from contracts.feature_spec import parse_feature_spec

SPEC_TOML = """\
# Feature spec of the synthetic demo dataset (training.synthetic).
[columns]
user_id = "user_id"
item_id = "item_id"
timestamp = "timestamp"

[features.user_id]
tower = "user"
kind = "categorical"
embedding_dim = 32

[features.age]
tower = "user"
kind = "numeric"

[features.country]
tower = "user"
kind = "categorical"
embedding_dim = 8

[features.recent_items]
tower = "user"
kind = "history"
embedding_dim = 32
max_length = 10

[features.hour_of_day]
tower = "context"
kind = "categorical"
dtype = "int"
derive = "hour_of_day"
embedding_dim = 8

[features.day_of_week]
tower = "context"
kind = "categorical"
dtype = "int"
derive = "day_of_week"
embedding_dim = 4

[features.device]
tower = "context"
kind = "categorical"
embedding_dim = 4

[features.item_id]
tower = "item"
kind = "categorical"
embedding_dim = 32

[features.category]
tower = "item"
kind = "categorical"
embedding_dim = 8

[features.tags]
tower = "item"
kind = "bag"
embedding_dim = 8
max_length = 4
"""

NIGHT_HOURS = frozenset(range(20, 24)) | frozenset(range(0, 5))
COUNTRIES = ("de", "fr", "jp", "us", "br", "in")
DEVICES = ("mobile", "desktop", "tv")
START_TIME = 1_700_000_000  # 2023-11-14, a Tuesday
CONTENT_NOISE = 1.2  # item content vector: noise over the spread of the cluster centres


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 1000
    num_clusters: int = 10
    interactions_per_user: int = 30
    taste_strength: float = 0.85
    category_purity: float = 0.8
    zipf_exponent: float = 0.9
    days: int = 60
    seed: int = 0
    content_dims: int = 0  # dense content features per item (content0 …); 0 = none
    order_strength: float = 0.0  # share of events that follow the previous item's cluster

    def __post_init__(self) -> None:
        if not 0.0 <= self.order_strength <= 1.0:
            raise ValueError(f"order_strength must be in [0, 1] (got {self.order_strength})")
        if not 0 <= self.content_dims <= 256:
            raise ValueError(f"content_dims must be in [0, 256] (got {self.content_dims})")
        if self.num_clusters < 2 or self.num_items < self.num_clusters:
            raise ValueError(f"need 2 <= num_clusters <= num_items (got {self.num_clusters}, "
                             f"{self.num_items})")
        if not 1 <= self.interactions_per_user < self.num_items:
            raise ValueError("interactions_per_user must be in [1, num_items) "
                             f"(got {self.interactions_per_user})")


def generate_synthetic(config: SyntheticConfig = SyntheticConfig()) -> tuple[Dataset, str]:
    """Returns the dataset and the TOML text of its feature spec."""
    rng = np.random.default_rng(config.seed)
    item_cluster, items = _items(config, rng)
    day_cluster, night_cluster, users = _users(config, rng)
    interactions = _interactions(config, rng, item_cluster, day_cluster, night_cluster)
    spec_toml = SPEC_TOML + _content_spec(config.content_dims)
    spec = parse_feature_spec(_toml(spec_toml), "<synthetic>")
    return Dataset(spec, interactions, users, items), spec_toml


def _content_spec(dims: int) -> str:
    return "".join(f'\n[features.content{j}]\ntower = "item"\nkind = "numeric"\n'
                   for j in range(dims))


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def _items(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    n, c = config.num_items, config.num_clusters
    cluster = rng.permutation(np.arange(n) % c)
    noisy = rng.random(n) > config.category_purity
    category = np.where(noisy, rng.integers(0, c, n), cluster)
    tags_per_cluster = 3
    tags = np.empty(n, dtype=object)
    for i in range(n):
        own = cluster[i] * tags_per_cluster + rng.choice(tags_per_cluster, 2, replace=False)
        other = rng.integers(0, c * tags_per_cluster, 1)
        chosen = own if rng.random() < 0.8 else np.concatenate([own[:1], other])
        tags[i] = tuple(f"tag{t}" for t in sorted(set(chosen.tolist())))
    items = {
        "item_id": np.array([f"i{i}" for i in range(n)], dtype=object),
        "category": np.array([f"cat{x}" for x in category], dtype=object),
        "tags": tags,
    }
    if config.content_dims:
        own = np.random.default_rng([config.seed, 1])  # leaves ``rng``'s stream untouched
        centres = own.normal(size=(c, config.content_dims))
        content = centres[cluster] + CONTENT_NOISE * own.normal(size=(n, config.content_dims))
        items.update({f"content{j}": content[:, j].astype(np.float32)
                      for j in range(config.content_dims)})
    return cluster, items


def _users(config: SyntheticConfig, rng: np.random.Generator):
    n, c = config.num_users, config.num_clusters
    day = rng.integers(0, c // 2, n) * 2          # even clusters: day
    night = rng.integers(0, c // 2, n) * 2 + 1    # odd clusters: night
    age = np.clip(rng.normal(20 + 4 * (day // 2), 4), 13, 90).astype(np.float32)
    leaning = (day // 2) % len(COUNTRIES)
    country_idx = np.where(rng.random(n) < 0.7, leaning, rng.integers(0, len(COUNTRIES), n))
    users = {
        "user_id": np.array([f"u{u}" for u in range(n)], dtype=object),
        "age": age,
        "country": np.array([COUNTRIES[i] for i in country_idx], dtype=object),
    }
    return day, night, users


def _interactions(config, rng, item_cluster, day_cluster, night_cluster) -> dict:
    n_users, per_user = config.num_users, config.interactions_per_user
    popularity = _popularity(config, rng, item_cluster)
    members = [np.flatnonzero(item_cluster == k) for k in range(config.num_clusters)]
    catalogue = _Sampler(np.arange(config.num_items), popularity)
    by_cluster = [_Sampler(m, popularity[m]) for m in members]
    ts = np.sort(START_TIME + rng.integers(0, config.days * 86400, (n_users, per_user)), axis=1)
    hours = (ts // 3600) % 24
    follow = next_clusters(config)
    users, items, times, devices = [], [], [], []
    for u in range(n_users):
        seen: set[int] = set()
        last = None
        for t, hour in zip(ts[u], hours[u], strict=True):
            night = int(hour) in NIGHT_HOURS
            cluster = night_cluster[u] if night else day_cluster[u]
            pool = by_cluster[cluster] if rng.random() < config.taste_strength else catalogue
            if config.order_strength and last is not None and (
                    rng.random() < config.order_strength):
                pool = by_cluster[follow[item_cluster[last]]]
            item = last = _draw_unseen(rng, pool, popularity, seen)
            seen.add(item)
            users.append(u)
            items.append(item)
            times.append(t)
            devices.append(_device(rng, night))
    return {
        "user_id": np.array([f"u{u}" for u in users], dtype=object),
        "item_id": np.array([f"i{i}" for i in items], dtype=object),
        "timestamp": np.array(times, dtype=np.int64),
        "device": np.array(devices, dtype=object),
    }


def next_clusters(config: SyntheticConfig) -> np.ndarray:
    """[num_clusters] int: the cluster that follows each one (one cycle through all of
    them, from a stream of its own)."""
    cycle = np.random.default_rng([config.seed, 2]).permutation(config.num_clusters)
    follow = np.empty(config.num_clusters, dtype=np.int64)
    follow[cycle] = np.roll(cycle, -1)
    return follow


def _popularity(config, rng, item_cluster) -> np.ndarray:
    pop = np.empty(config.num_items)
    for k in range(config.num_clusters):
        idx = np.flatnonzero(item_cluster == k)
        ranks = rng.permutation(len(idx)) + 1
        pop[idx] = ranks.astype(float) ** -config.zipf_exponent
    return pop


class _Sampler:
    """Draws from ``candidates`` with probability ∝ ``weights`` in O(log n) a draw."""

    def __init__(self, candidates: np.ndarray, weights: np.ndarray) -> None:
        self.candidates, self.cdf = candidates, np.cumsum(weights)

    def draw(self, rng: np.random.Generator, seen: set[int], tries: int = 64) -> int | None:
        """A candidate not in ``seen`` (rejection sampling, so the draw is exactly
        weights-proportional among the unseen); None when ``tries`` draws were all seen."""
        if len(self.cdf) == 0:
            return None
        for _ in range(tries):
            at = int(np.searchsorted(self.cdf, rng.random() * self.cdf[-1], side="right"))
            item = int(self.candidates[min(at, len(self.candidates) - 1)])
            if item not in seen:
                return item
        return None


def _draw_unseen(rng, pool: _Sampler, popularity, seen) -> int:
    item = pool.draw(rng, seen)
    if item is not None:
        return item
    candidates = pool.candidates  # nearly all of the pool is seen: draw among the rest
    weights = popularity[candidates].copy()
    if seen:
        weights[np.isin(candidates, list(seen))] = 0.0
    if weights.sum() == 0:
        weights = popularity.copy()
        weights[list(seen)] = 0.0
        candidates = np.arange(len(popularity))
    return int(rng.choice(candidates, p=weights / weights.sum()))


def _device(rng, night: bool) -> str:
    probs = (0.2, 0.2, 0.6) if night else (0.5, 0.4, 0.1)
    return DEVICES[rng.choice(3, p=probs)]
