"""One rank of a distributed run (`torchrun ... -m training.rank_worker SPEC`): the same train() as one process.

The Trainer finds torchrun's RANK/WORLD_SIZE and trains with DDP. Rank 0 relays its Trainer events and its
warnings to the launching process (training.distributed) and writes the result there; any rank that fails
writes its error (message, code, param) beside the spec, where the launcher turns it into one clear error.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from core.atomic import write_json
from core.errors import ScalpelError
from core.model_store import ModelEntry
from core.paths import enforce_offline
from training import distributed
from training.config import TrainConfig
from training.dataset import Example
from training.trainer import train


def _error(folder: Path, rank: int, message: str, code: str | None, param: str | None) -> None:
    write_json(
        folder / f"error-{rank}.json",
        {"rank": rank, "message": message, "code": code, "param": param, "time": time.time()},
    )


def run(spec_path: Path) -> int:
    folder, rank = spec_path.parent, distributed.rank()
    spec = distributed.RankSpec.read(spec_path)
    if distributed.world_size() != spec.world_size or not distributed.in_rank():
        # accelerate starts a MULTI_CPU config's processes alone (without mpirun): each would train by itself
        _error(
            folder,
            rank,
            f"the launcher started {distributed.world_size()} process(es) that see each other, not "
            f"{spec.world_size}; check the accelerate config's distributed_type",
            "invalid_launch",
            "accelerate_config",
        )
        return 1
    relay = distributed.RelayToParent(spec.relay) if rank == 0 and spec.relay else None
    handler = distributed.LogToParent(relay) if relay else None
    if handler is not None:
        logging.getLogger("scalpel").addHandler(handler)
    try:
        result = train(
            TrainConfig.model_validate(spec.config),
            ModelEntry(**spec.entry),
            [Example(**e) for e in spec.examples],
            Path(spec.out_dir),
            Path(spec.work_dir),
            eval_examples=[Example(**e) for e in spec.eval_examples] if spec.eval_examples is not None else None,
            max_steps=spec.max_steps,
            progress=False,  # the launching process draws the bar from rank 0's relayed events
            resume=spec.resume,
            callbacks=(relay,) if relay else (),
            init_adapter=Path(spec.init_adapter) if spec.init_adapter else None,
        )
    except ScalpelError as exc:
        _error(folder, rank, exc.message, exc.code, exc.param)
        return 1
    except Exception as exc:  # a bug or a broken environment: the launcher shows its type, torchrun's log the trace
        traceback.print_exc()
        _error(folder, rank, f"{type(exc).__name__}: {exc}", "training_failed", None)
        return 1
    finally:
        if handler is not None:
            logging.getLogger("scalpel").removeHandler(handler)
        if relay is not None:
            relay.close()
    if rank == 0:
        write_json(folder / distributed.RESULT_NAME, result.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun ... -m training.rank_worker SPEC", file=sys.stderr)
        return 2
    enforce_offline()
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
