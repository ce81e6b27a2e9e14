"""One quick two-seed demo for every cvlm test that needs saved checkpoints."""

import sys

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from cvlm.cli import main

    out = tmp_path_factory.mktemp("demo")
    old = sys.argv
    sys.argv = ["cvlm", "demo", "--quick", "--out", str(out), "--no-progress", "--seeds", "0,1"]
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        sys.argv = old
    return out
