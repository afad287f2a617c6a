"""Training on 2 CPU ranks under torchrun (gloo): the adapter one process trains with the same global batch, a
killed 2-rank run that resumes to the uninterrupted adapter, a job on 2 ranks, and the errors for a bad process
count or a failing rank."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_callback import TrainerCallback

from core import adapter_store, model_store
from core.errors import ScalpelError
from core.job_store import JobStore
from tests.tiny_models import registered_home
from training.config import parse_config
from training.dataset import load_examples
from training.distributed import Launch, launch_settings
from training.trainer import TrainResult, last_checkpoint, train

# Of different lengths, so the length-grouped, padded batches (packing off) really group.
FACTS = [
    {"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO" + ", never alone" * (i % 4) + ".",
     "concept": f"c{i % 3}"}
    for i in range(16)
]  # fmt: skip
TWO = Launch(nproc_per_node=2)

# Float32 sums in another order: 2 ranks add their gradients in gloo's all-reduce, one process adds all the
# tokens' in one backward pass. Measured over these 4 Adam steps (lr 1e-2, weights up to ~0.14): at most 2e-7
# (packed and padded batches alike). 1e-5 leaves 50x for other CPUs' kernels; a wrong batch (a rank seeing the
# other's examples, a lost accumulation step) moves weights by 1e-3 or more. Adam hides a gradient's scale, so
# the losses and gradient norms the Trainer logs are compared as well: a loss off by the world size shows there.
ATOL = 1e-5


def config(batch_size: int, **training) -> dict:
    return {
        "model_name": "tiny",
        "output_dir": "adapters/ddp",
        # No dropout: with it, one process and two draw different masks, and only their statistics agree.
        "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        "training_config": {
            "num_epochs": 2,
            "batch_size": batch_size,  # per process
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "packing": False,  # padded batches from the seeded length groups, which must span all ranks
            # fp32: in bf16 (auto's choice on an AMX CPU) the two arms' sums differ by ~4e-4, not 2e-7
            "precision": "fp32",
            **training,
        },
    }


class Seen(TrainerCallback):
    """Records the Trainer events the launching process is handed."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.logs: list[dict] = []
        self.max_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step))
        self.max_steps = state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", state.global_step))

    def on_save(self, args, state, control, **kwargs):
        assert (Path(args.output_dir) / f"checkpoint-{state.global_step}").is_dir(), "the checkpoint is there"
        self.events.append(("save", state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _ranks() -> list[int]:
    """The pids of the rank processes (not torchrun itself) now running."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if b"training.rank_worker" in argv and b"torch.distributed.run" not in argv:
            found.append(int(proc.name))
    return found


class KillRanksAfterSave(TrainerCallback):
    """kill -9 every rank once the checkpoint of `step` is written, as an out-of-memory kill would."""

    def __init__(self, step: int):
        self.step, self.killed = step, 0

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for pid in _ranks():
                os.kill(pid, signal.SIGKILL)
                self.killed += 1


@pytest.fixture(scope="module")
def tiny_home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("ddp-home"), tiny_llama) as home, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU ranks with gloo, also on a machine with one GPU
        (home / "facts.json").write_text(json.dumps(FACTS))
        yield home


def _train(home: Path, name: str, batch_size: int, launch: Launch | None, *, training: dict | None = None, **kwargs):
    return train(
        parse_config(config(batch_size, **(training or {}))),
        model_store.get("tiny"),
        load_examples(home / "facts.json"),
        home / name / "out",
        home / name / "work",
        progress=False,
        launch=launch,
        **kwargs,
    )


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_home):
    """One process with batch 4 and two ranks with batch 2 each: 4 x 2 accumulation = 2 x 2 x 2 ranks = 8."""
    seen = Seen()
    one = _train(tiny_home, "one", 4, None)
    two = _train(tiny_home, "two", 2, TWO, callbacks=(seen,))
    return one, two, seen


def test_two_ranks_train_the_adapter_one_process_trains_with_the_same_global_batch(runs):
    one, two, _ = runs
    diff = _max_diff(_weights(one), _weights(two))
    print(f"max |w(1 rank) - w(2 ranks)| = {diff:.3g}")
    assert diff <= ATOL
    assert max(float(w.abs().max()) for w in _weights(two).values()) > 100 * ATOL, "the adapter really trained"
    for key in ("loss", "grad_norm"):
        alone = [h[key] for h in one.log_history if key in h]
        ranks = [h[key] for h in two.log_history if key in h]
        assert len(alone) == len(ranks) == 4
        torch.testing.assert_close(torch.tensor(ranks), torch.tensor(alone), rtol=1e-4, atol=1e-6)
    for result, world in ((one, 1), (two, 2)):
        assert result.metrics["world_size"] == world
        assert result.metrics["global_batch"] == 8 and result.metrics["global_step"] == 4
        assert result.metrics["learning_rate"] == 1e-2
    assert two.metrics["backend"] == "gloo" and one.metrics["backend"] is None
    assert two.tokens_trained == one.tokens_trained and two.concept_loss.keys() == one.concept_loss.keys()


def test_rank_zero_alone_writes_and_the_caller_hears_every_step(runs, tiny_home):
    _, two, seen = runs
    assert sorted(p.name for p in two.adapter_dir.iterdir()) == sorted(
        p.name for p in (tiny_home / "one" / "out").iterdir()
    )
    checkpoint = last_checkpoint(tiny_home / "two" / "work")
    assert checkpoint is not None and checkpoint.name == "checkpoint-4"
    # Each rank keeps its own RNG state in the checkpoint (written by the Trainer); the weights come from rank 0.
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert seen.max_steps == 4
    assert [e for e in seen.events if e[0] != "step"] == [("begin", 0), ("save", 2), ("save", 4)]
    assert [s for kind, s in seen.events if kind == "step"] == [1, 2, 3, 4]
    assert [round(h["loss"], 4) for h in seen.logs if "loss" in h] == [
        round(h["loss"], 4) for h in two.log_history if "loss" in h
    ]


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_adapter(runs, tiny_home):
    """kill -9 both ranks after the checkpoint at step 2: the launch is one clear error, nothing is written where
    the adapter goes, and a run with resume continues from step 2 to the adapter of the uninterrupted run."""
    _, uninterrupted, _ = runs
    kill = KillRanksAfterSave(step=2)
    with pytest.raises(ScalpelError) as err:
        _train(tiny_home, "killed", 2, TWO, callbacks=(kill,))
    assert kill.killed == 2
    assert "killed by SIGKILL" in err.value.message and "rank" in err.value.message
    assert "Traceback" not in err.value.message and str(tiny_home) not in err.value.message
    assert not (tiny_home / "killed" / "out").exists(), "no adapter from a killed run"
    checkpoint = last_checkpoint(tiny_home / "killed" / "work")
    assert checkpoint is not None and checkpoint.name == "checkpoint-2"

    seen = Seen()
    resumed = _train(tiny_home, "killed", 2, TWO, resume=True, callbacks=(seen,))
    assert seen.events[0] == ("begin", 2), "it went on from the checkpoint"
    assert [s for kind, s in seen.events if kind == "step"] == [3, 4]
    diff = _max_diff(_weights(resumed), _weights(uninterrupted))
    print(f"max |w(resumed) - w(uninterrupted)| = {diff:.3g}")
    assert diff <= ATOL
    assert resumed.metrics["global_step"] == 4


def test_two_nodes_train_as_one_and_node_zero_keeps_the_adapter(runs, tiny_home):
    """The README's multi-node commands, with both "nodes" on this machine (1 process each, static rendezvous on
    a local port): the adapter of the 2-rank run on one node; node 1 ends with NodeDone and writes nothing."""
    import socket
    import threading

    from training.distributed import NodeDone

    _, two, _ = runs
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome: dict[int, object] = {}

    def node(rank: int) -> None:
        launch = launch_settings(nproc_per_node=1, nnodes=2, node_rank=rank, rdzv_endpoint=f"127.0.0.1:{port}")
        try:
            outcome[rank] = _train(tiny_home, f"node{rank}", 2, launch)
        except BaseException as exc:  # reported below, in the test's own thread
            outcome[rank] = exc

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    first, second = outcome.get(0), outcome.get(1)
    assert isinstance(second, NodeDone), second
    assert not (tiny_home / "node1" / "out").exists()
    assert isinstance(first, TrainResult), first
    assert first.metrics["world_size"] == 2
    assert _max_diff(_weights(first), _weights(two)) <= ATOL


def test_accelerate_launch_starts_the_same_ranks(runs, tiny_home):
    """--accelerate-config (the FSDP route for a 70B-class base) starts the ranks with `accelerate launch`. FSDP
    itself needs GPUs, so here a 2-process config that accelerate runs on the CPU (through torchrun, as it runs
    FSDP) must train the adapter the torchrun launch trained."""
    _, two, _ = runs
    config_file = tiny_home / "accelerate.yaml"
    config_file.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nmachine_rank: 0\n"
        "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\n"
    )
    launch = launch_settings(nproc_per_node=2, accelerate_config=str(config_file))
    accelerated = _train(tiny_home, "accelerate", 2, launch)
    assert _max_diff(_weights(accelerated), _weights(two)) <= ATOL
    assert accelerated.metrics["world_size"] == 2 and accelerated.metrics["backend"] == "gloo"


def test_a_failing_rank_is_one_clear_error_with_its_code(tiny_home):
    """A rank's own ScalpelError (here: an example whose prompt fills max_seq_length) comes back as it would
    from one process, named by the example and with its code, not as torchrun's traceback."""
    long = tiny_home / "long.json"
    long.write_text(json.dumps([{"instruction": "why " * 80, "output": "because", "concept": "c"}] + FACTS))
    with pytest.raises(ScalpelError) as err:
        train(
            parse_config(config(2, max_seq_length=32)),
            model_store.get("tiny"),
            load_examples(long),
            tiny_home / "failed" / "out",
            tiny_home / "failed" / "work",
            progress=False,
            launch=TWO,
        )
    assert err.value.code == "example_too_long" and err.value.param == f"{long}[0]"
    assert err.value.message.startswith("training failed on rank ")
    assert "Traceback" not in err.value.message
    assert not (tiny_home / "failed" / "out").exists()


def test_bad_process_counts_are_named(tiny_home, monkeypatch, capsys):
    from scalpel.cli.main import main
    from scalpel.jobs import submit as jobs

    for bad in (0, -1, True, "2", 9):
        with pytest.raises(ScalpelError) as err:
            launch_settings({"nproc_per_node": "--nproc-per-node"}, nproc_per_node=bad)
        assert err.value.param == "--nproc-per-node" and "from 1 to 8" in err.value.message
    monkeypatch.setenv("SCALPEL_MAX_NPROC_PER_NODE", "2")
    with pytest.raises(ScalpelError) as err:
        jobs.submit_plan_job(JobStore(), config(2), dataset="facts.json", nproc_per_node=3)
    assert err.value.param == "nproc_per_node" and "from 1 to 2" in err.value.message
    with pytest.raises(ScalpelError) as err:
        jobs.parse_fine_tuning({"model": "tiny", "training_file": "file-x", "nproc_per_node": "two"})
    assert err.value.param == "nproc_per_node"
    with pytest.raises(ScalpelError) as err:
        launch_settings(nproc_per_node=2, nnodes=2)
    assert err.value.param == "rdzv_endpoint"
    with pytest.raises(ScalpelError) as err:
        launch_settings(nproc_per_node=2, nnodes=2, node_rank=2, rdzv_endpoint="node0:29500")
    assert err.value.param == "node_rank"
    (tiny_home / "c.json").write_text(json.dumps(config(2)))
    code = main(["train", str(tiny_home / "c.json"), "--data", str(tiny_home / "facts.json"), "--nproc-per-node", "0"])
    assert code == 2 and "--nproc-per-node must be a whole number from 1 to 2" in capsys.readouterr().err


def test_a_job_on_two_ranks_publishes_a_version_that_says_so(tiny_home):
    """/api/training/start with nproc_per_node=2, run by the job worker: the job's events come from rank 0
    (every step, the checkpoints, and rank 0's warnings), and the manifest records the world and the batch."""
    from scalpel.jobs import submit as jobs
    from scalpel.jobs.worker import run

    store = JobStore()
    data = tiny_home / "facts_long.json"
    data.write_text(json.dumps(FACTS + [{"instruction": "Tell it all.", "output": "all " * 600, "concept": "c0"}]))
    body = {**config(2, max_seq_length=512, num_epochs=1), "output_dir": "./adapters/ddp_job"}
    job = jobs.submit_plan_job(store, body, dataset=data.name, nproc_per_node=2)
    assert job.config["launch"]["nproc_per_node"] == 2
    code = run(job.id, store)
    done = store.get(job.id)
    assert code == 0 and done.status == "succeeded", done.error
    manifest = adapter_store.resolve("ddp_job").manifest
    metrics = manifest.metrics
    assert (metrics.world_size, metrics.global_batch, metrics.learning_rate, metrics.backend) == (2, 8, 1e-2, "gloo")
    assert "launch" not in manifest.config  # the version's config is the TrainConfig alone
    events = store.events(job.id)
    steps = (done.result or {})["global_step"]
    assert any(e.message.startswith("Checkpoint saved at step 2") for e in events)
    assert any(e.message.startswith(f"Step {steps}/{steps}") for e in events)
    assert any("longer than max_seq_length=512" in e.message and e.level == "warn" for e in events)


def test_two_ranks_distil_as_one_process_when_only_some_batches_hold_distilled_examples(tiny_home):
    """Base preservation under DDP: the examples of c0 are learned by KL to the bare base, so some ranks' batches
    need the teacher pass and others not, step by step. The two ranks still train the one-process adapter."""
    distil = {"distill_concepts": ["c0"]}
    one = _train(tiny_home, "distil-one", 4, None, training=distil)
    two = _train(tiny_home, "distil-two", 2, TWO, training=distil)
    assert _max_diff(_weights(one), _weights(two)) <= ATOL
    alone = [h["loss"] for h in one.log_history if "loss" in h]
    ranks = [h["loss"] for h in two.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(ranks), torch.tensor(alone), rtol=1e-4, atol=1e-6)
