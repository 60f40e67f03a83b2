"""The trainer: learning, milestones, bit-identical resume, validation data, bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tfsearch.cli import main
from tfsearch.errors import InputError
from tfsearch.maps.cache import read_map_set
from tfsearch.transfusion.job import TrainDir, TrainJob
from tfsearch.transfusion.profiles import get_profile
from tfsearch.transfusion.runtime import Runtime
from tfsearch.transfusion.trainer import Trainer, train
from tfsearch.transfusion.training_data import held_out

QUIET = Runtime(device="cpu", progress=False)


def tiny_profile(**changes):
    base = dict(
        image_size=32,
        base_channels=8,
        norm_groups=4,
        head_norm_groups=4,
        time_dim=32,
        epochs=4,
        batch_size=8,
        lr_step_epochs=3,
        milestone_every=2,
        inference_batch=16,
        steps=4,  # every milestone runs the reverse process: 2 network calls per image instead of 18
    )
    base.update(changes)
    return get_profile("cpu").replace(**base)


def tiny_job(root, **changes):
    return TrainJob(dataset="demo", category="stripes", profile=tiny_profile(), data_root=root, **changes)


class Stop(Exception):
    pass


def test_a_short_run_lowers_the_loss(demo_dataset_root, tmp_path):
    profile = tiny_profile(epochs=8, lr_step_epochs=8, milestone_every=8)
    job = TrainJob(dataset="demo", category="stripes", profile=profile, data_root=demo_dataset_root)
    trainer = train(job, tmp_path / "run", QUIET)
    losses = [row["loss_total"] for row in trainer.history]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


def test_a_diverged_training_stops_at_once_naming_the_learning_rate(demo_dataset_root, tmp_path):
    # a learning rate of 1000 turns the loss to NaN in the first epoch: the trainer stops there, instead of
    # training on and failing only when the milestone's maps are written
    profile = tiny_profile(lr=1e3)
    job = TrainJob(dataset="demo", category="stripes", profile=profile, data_root=demo_dataset_root)
    with pytest.raises(InputError, match=r"stripes: training diverged \(loss nan\) at epoch 1, .*lr 1000"):
        train(job, tmp_path / "run", QUIET)
    assert TrainDir(tmp_path / "run").weight_epochs() == []


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_grad_clip_bounds_the_gradient_norm_of_every_step(demo_dataset_root, tmp_path):
    def step_norms(grad_clip: float) -> list[float]:
        profile = tiny_profile(epochs=1, milestone_every=1, grad_clip=grad_clip)
        job = TrainJob("demo", "stripes", profile, data_root=demo_dataset_root)
        trainer = Trainer(job, tmp_path / f"{grad_clip}", QUIET)
        norms, step = [], trainer.optimizer.step

        def recorded_step(*args, **kwargs):
            grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
            return step(*args, **kwargs)

        trainer.optimizer.step = recorded_step
        trainer.train_epoch()
        return norms

    unclipped, clipped = step_norms(0.0), step_norms(0.05)
    assert len(clipped) == len(unclipped) > 1
    assert max(unclipped) > 0.1  # the paper's setting leaves the gradients as they are
    assert max(clipped) <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_profile_asks_and_the_device_has_it(native, monkeypatch):
    monkeypatch.setattr("tfsearch.transfusion.runtime.native_bf16", lambda device: native)
    cpu, asks, plain = torch.device("cpu"), tiny_profile(bf16=True), tiny_profile()
    assert Runtime(precision="auto").network_precision(asks, cpu) == ("bf16" if native else "fp32")
    assert Runtime(precision="auto").network_precision(plain, cpu) == "fp32"
    assert Runtime(precision="fp32").network_precision(asks, cpu) == "fp32"
    assert Runtime(precision="bf16").network_precision(plain, cpu) == "bf16"  # asked for, emulated or not


def test_milestones_write_checkpoints_and_maps(demo_dataset_root, tmp_path):
    trainer = train(tiny_job(demo_dataset_root), tmp_path / "run", QUIET)
    run = TrainDir(tmp_path / "run")
    # weights at every milestone; the whole training state (optimiser included) at the latest only
    assert run.weight_epochs() == [2, 4] and run.checkpoint_epochs() == [4]
    assert run.map_epochs() == [2, 4]
    weights = torch.load(run.checkpoint(2) / "model.pt", weights_only=True)
    assert set(weights) == {"model", "epoch"} and weights["epoch"] == 2
    state = torch.load(run.checkpoint(4) / "trainer.pt", weights_only=True)
    assert "optimizer" in state and all(
        torch.equal(state["model"][k], v)
        for k, v in torch.load(run.checkpoint(4) / "model.pt", weights_only=True)["model"].items()
    )
    maps = read_map_set(run.maps(4))
    category = trainer.data.category
    assert list(maps.image_ids) == [s.image_id for s in category.test]
    assert maps.m_disc.shape == (len(category.test), 32, 32)
    assert maps.m_disc.dtype == np.float32  # map cache version 2
    # M_disc sums T−2 probabilities and divides by T−1; M_recon is a squared error of [0,1] images
    steps = trainer.profile.steps
    assert 0 <= float(maps.m_disc.min()) and float(maps.m_disc.max()) <= (steps - 2) / (steps - 1) + 1e-3
    assert 0 <= float(maps.m_recon.min()) and float(maps.m_recon.max()) <= 1
    assert maps.labels.tolist() == [s.label for s in category.test]
    assert maps.meta["epoch"] == 4 and maps.meta["split"] == "test"
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4


def test_resume_is_bit_identical_to_an_uninterrupted_run(demo_dataset_root, tmp_path):
    job = tiny_job(demo_dataset_root)
    reference = train(job, tmp_path / "a", QUIET)

    def stop_after_first(milestone):
        raise Stop

    with pytest.raises(Stop):
        train(job, tmp_path / "b", QUIET, on_milestone=stop_after_first)
    assert TrainDir(tmp_path / "b").checkpoint_epochs() == [2]
    first_weights = (TrainDir(tmp_path / "b").checkpoint(2) / "model.pt").read_bytes()
    resumed = train(job, tmp_path / "b", QUIET, resume=True)

    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert torch.equal(reference.generator.get_state(), resumed.generator.get_state())
    strip = [
        {k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
        for row in reference.history
    ]
    assert strip == [
        {k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in resumed.history
    ]
    a, b = read_map_set(TrainDir(tmp_path / "a").maps(4)), read_map_set(TrainDir(tmp_path / "b").maps(4))
    assert np.array_equal(a.m_disc, b.m_disc) and np.array_equal(a.m_recon, b.m_recon)
    # the milestone that existed was not rewritten, and its training state went when the next one came
    assert (TrainDir(tmp_path / "b").checkpoint(2) / "model.pt").read_bytes() == first_weights
    assert TrainDir(tmp_path / "b").checkpoint_epochs() == [4]


@pytest.mark.parametrize("layout", ["model.pt", "trainer.pt at every milestone"])
def test_lost_maps_are_recomputed_from_the_weights(demo_dataset_root, tmp_path, layout):
    job = tiny_job(demo_dataset_root)
    train(job, tmp_path / "run", QUIET)
    run = TrainDir(tmp_path / "run")
    before = read_map_set(run.maps(2)).m_disc.copy()
    if layout != "model.pt":  # a run written before model.pt: the weights are in each milestone's trainer.pt
        weights = run.checkpoint(2) / "model.pt"
        state = {"model": torch.load(weights, weights_only=True)["model"]}
        torch.save(state, weights.with_name("trainer.pt"))
        weights.unlink()
        (run.checkpoint(4) / "model.pt").unlink()
        assert run.weight_epochs() == [2, 4] and run.weights(2).name == "trainer.pt"
    checkpoint = (run.checkpoint(4) / "trainer.pt").stat().st_mtime_ns
    shutil.rmtree(run.maps(2))
    trainer = train(job, tmp_path / "run", QUIET, resume=True)
    assert trainer.history[-1]["epoch"] == 4
    assert np.array_equal(read_map_set(run.maps(2)).m_disc, before)
    assert (run.checkpoint(4) / "trainer.pt").stat().st_mtime_ns == checkpoint


def test_an_existing_run_is_never_overwritten(demo_dataset_root, tmp_path):
    job = tiny_job(demo_dataset_root)
    train(job, tmp_path / "run", QUIET)
    with pytest.raises(InputError, match="--resume"):
        train(job, tmp_path / "run", QUIET)
    changed = TrainJob(
        dataset="demo", category="stripes", profile=tiny_profile(lr=0.5), data_root=demo_dataset_root
    )
    with pytest.raises(InputError, match="differs from this job in \\['profile'\\]"):
        train(changed, tmp_path / "run", QUIET, resume=True)


def test_synthetic_validation_holds_out_good_images(demo_dataset_root, tmp_path):
    job = tiny_job(demo_dataset_root, validation="synthetic", val_fraction=0.1)
    trainer = Trainer(job, tmp_path / "run", QUIET)
    data = trainer._ensure_data()
    total = len(data.category.train)
    held = held_out(total, 0.1, job.profile.seed)
    assert data.train_images.shape[0] == total - len(held)
    val = data.eval_sets["val"]
    assert len(val.image_ids) == 2 * len(held)
    assert val.labels[: len(held)].sum() == 0 and val.labels[len(held) :].sum() > 0
    assert not val.masks[: len(held)].any()
    # the same held-out images, unchanged outside the synthetic defect
    normal, defective = val.images[: len(held)], val.images[len(held) :]
    outside = ~torch.from_numpy(val.masks[len(held) :])[:, None].expand_as(defective)
    assert torch.equal(normal[outside], defective[outside])
    again = Trainer(job, tmp_path / "other", QUIET)._ensure_data().eval_sets["val"]
    assert torch.equal(again.images, val.images)


def test_train_and_evaluate_commands(demo_dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "demo", "--data-root", str(demo_dataset_root), "--category", "weave"]
    args += ["--profile", "cpu", "--epochs", "1", "--milestones", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["milestones"] == [1] and job["profile"]["epochs"] == 1
    assert main(["evaluate", str(out), "--epoch", "1", "--lam", "0.5", "--kernel", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["epoch"] == 1 and result["lam"] == 0.5 and result["kernel"] == 3
    assert 0 <= result["image_auroc"] <= 1 and 0 <= result["aupro"] <= 1
    assert main(["evaluate", str(out), "--epoch", "7"]) == 2
    assert "--epoch 7" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mvtec", "--category", "carpet"], "--data-root"),
        (["--dataset", "demo", "--category", "nope"], "nope"),
        (["--dataset", "demo", "--category", "disk", "--epochs", "0"], "--epochs"),
        (["--dataset", "demo", "--category", "disk", "--milestones", "a,b"], "--milestones"),
        (["--dataset", "demo", "--category", "disk", "--milestones", "9999"], "milestones"),
    ],
)
def test_bad_train_input(args, message, tmp_path, demo_dataset_root, capsys):
    if "demo" in args:
        args = [*args, "--data-root", str(demo_dataset_root)]
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_train_and_evaluate_need_neither_ray_nor_optuna_nor_wandb():
    """A GPU image without them runs bench/gpu_paper_demo.sh: the two subcommands alone import none."""
    code = (
        "import sys\n"
        "for name in ('ray', 'optuna', 'wandb'): sys.modules[name] = None  # importing it now fails\n"
        "from tfsearch.cli import build_parser\n"
        "parser = build_parser(('tfsearch.cli.train', 'tfsearch.cli.evaluate'))\n"
        "argvs = (['evaluate', 'RUN'], ['train', '--out', 'R'])\n"
        "commands = [parser.parse_args(argv).command for argv in argvs]\n"
        "print(*commands)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["evaluate", "train"]
