"""Arguments and start-up shared by the command-line entry points (extract, train, tune, evaluate)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import socket
from contextlib import ExitStack

from cube_ray.config import MAX_SEED, DataConfig, check_gpu_count
from cube_ray.fsutil import cache_dir


def int_in(low: int, high: int | None = None):
    """An argparse `type`: an integer in [low, high]; argparse names the flag in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value
    return parse


def float_at_least(low: float):
    """An argparse `type`: a finite number >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got {text}")
        return value
    return parse


positive_int, seed_int = int_in(1), int_in(0, MAX_SEED)


def given_options(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the options on the command line, even one given with its default value: argv is parsed again
    into a namespace preset with a marker, which argparse replaces only for the options it meets."""
    unset = object()
    dests = vars(p.parse_args(argv))
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(given).items() if value is not unset}


def default_store() -> str:
    return os.environ.get("CUBE_RAY_STORE", str(cache_dir() / "store"))


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", help="question/answer pairs: .jsonl, .csv, .tsv or .parquet, optionally .gz (default: the bundled SQuAD sample)")
    p.add_argument("--eval-pairs", help="an explicit eval file; it becomes the eval split as is")
    p.add_argument("--limit", type=int_in(0), help="keep only the first N pairs of each file (0: all; default: all, "
                   "except the search's embedded default)")
    p.add_argument("--decontaminate", action="store_true",
                   help="drop eval pairs whose text also occurs in train (recorded in the manifest) instead of refusing")
    p.add_argument("--val-fraction", type=float_at_least(0.0),
                   help="move this fraction of the train split (whole documents) into a 'val' split that picks "
                        "models (early stopping, best checkpoint, the search), so the eval split is used only for the "
                        "final report (default: 0: models are picked on eval)")
    p.add_argument("--teacher-config", help="a YAML file of extra teacher specs (name -> fields, as in teachers/builtin.yaml)")
    add_gpus_per_actor(p)
    p.add_argument("--store", default=default_store(), help="embedding store folder (default: %(default)s; env CUBE_RAY_STORE)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' joins a running cluster; default: a local one)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for the document split (and everything else downstream)")


def gpu_count(text: str) -> float:
    """An argparse `type`: 0, a fraction of one GPU, or a whole number of GPUs (what Ray can place)."""
    value = float_at_least(0.0)(text)
    try:
        check_gpu_count(value, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_gpus_per_actor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-actor", type=gpu_count, default=None,
                   help="GPUs of each extraction actor, for every teacher (fractions share a GPU; 0: all on CPU; "
                        "default: each teacher spec's gpus:, e.g. 1 for llama3-8b and mistral-7b, 0 for the rest)")


def data_config(args: argparse.Namespace) -> DataConfig:
    cfg = DataConfig(pairs=args.pairs, eval_pairs=args.eval_pairs, limit=args.limit or None, seed=args.seed,
                     decontaminate=args.decontaminate, val_fraction=args.val_fraction or 0.0)
    cfg.validate()
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API calls go (else: the newest cluster of this host)


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports nothing listens on now, on any address (all bound at once, so no two are the same)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def starts_own_cluster() -> bool:
    """Whether ray.init() without an address starts a cluster, rather than joining the host's (`ray start`)."""
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init itself asks

    return canonicalize_bootstrap_address(None) is None


def init_ray(address: str | None = None) -> None:
    """Start (or join) Ray once, and say where its dashboard is."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    own = {}
    if not address:  # the host's cluster (`ray start`), else one this process starts (its processes inherit the env)
        # Ray Train starts a preemption watcher actor per run to drain spot nodes before they go: a trial's 8th
        # process, and nothing here can be preempted. A joined cluster (--address, `ray up`) keeps Ray's default.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        # Without an address, Ray's state API asks the newest cluster of this host: with a second one started later
        # (another search, a test run), Ray Train's placement-group cleaner asked that one whether this cluster's
        # run controller lived, was told no, and removed a live run's workers. Its own dashboard, for every process.
        # An address inherited from a parent that started a cluster of its own (the SQuAD study's script, then its
        # search in a subprocess) names the parent's cluster: a cluster started here replaces it.
        if starts_own_cluster():
            port = free_ports(1)[0]
            os.environ[API_SERVER_ENV], own["dashboard_port"] = f"http://127.0.0.1:{port}", port
    ctx = ray.init(address=address, include_dashboard=None, logging_level=logging.WARNING, **own)
    url = getattr(ctx, "dashboard_url", None)
    print(f"Ray dashboard: http://{url}" if url else "Ray dashboard: not running (install ray[default])", flush=True)
