"""A serving process keeps the cyclic garbage collector off what it loaded once, and
still frees an old pair's cycles after a swap (retrieval.long_lived). Each spec runs in
a fresh interpreter: freezing is process-wide and must not touch the test runner's."""

import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    import gc, weakref
    from retrieval import long_lived

    class Pair:  # a loaded pair with a reference cycle inside, as real objects have
        def __init__(self):
            self.tables = [[n] for n in range(20_000)]
            self.me = self
""")


def run(body: str) -> str:
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_what_is_alive_when_serving_starts_is_frozen_and_nothing_changes_without_enable():
    out = run("""
        pair = Pair()
        long_lived.pair_changed(settle_s=0)  # not enabled: a no-op
        print(gc.get_freeze_count())
        long_lived.enable()
        print(gc.get_freeze_count())
    """).split()
    assert int(out[0]) == 0
    assert int(out[1]) > 20_000  # the pair's lists among them


def test_after_a_swap_the_old_pairs_cycles_are_freed_and_the_new_state_is_frozen_again():
    out = run("""
        old = Pair()
        alive = weakref.ref(old)
        long_lived.enable()
        frozen_with_old = gc.get_freeze_count()
        new = Pair()
        long_lived.pair_changed(settle_s=0)   # the swap: `new` serves, `old` is dropped
        del old
        assert gc.get_freeze_count() == 0     # unfrozen until the next full collection
        gc.collect()
        print(alive() is None, gc.get_freeze_count() > 20_000, frozen_with_old > 20_000)
    """).split()
    assert out == ["True", "True", "True"]


def test_a_full_collection_soon_after_a_swap_refreezes_nothing_yet():
    """Calls still on the old pair hold it for a moment: survivors are frozen only once a
    full collection runs past the settling time."""
    out = run("""
        long_lived.enable()
        long_lived.pair_changed(settle_s=3600)
        gc.collect()
        print(gc.get_freeze_count())
    """).split()
    assert out == ["0"]
