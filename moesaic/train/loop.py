"""The training loop: one process or many (torchrun), expert-parallel, resumable exactly.

Per step: this rank's slice of the global batch, in ``accum_steps`` micro-batches, each:
batched augmentation on the device -> forward under autocast, every random layer keyed by
sample (:mod:`moesaic.keyed`) -> cross-entropy (label
smoothing, mixup/cutmix) + the MoE aux loss -> backward (gradients accumulated locally,
synchronised by ``moesaic.parallelize`` after the last); then one all-reduce of the step's
loss and accuracy (every rank sees a non-finite loss at once and all stop before the step is
applied, and every rank stops there when any was sent Ctrl-C or SIGTERM,
:mod:`moesaic.train.stops`) -> EP-aware clipping -> AdamW -> warmup/cosine scheduler. Each
epoch ends with an evaluation at the eval capacity factor, metrics, plots and, when due, a
checkpoint.

Randomness depends on (seed, step, image) only: augmentation draws for the whole global batch
and keeps this slice, mixing pairs images 2j and 2j + 1 of the global batch, and dropout,
stochastic depth and router noise hash per-image keys drawn for the global batch. So the
number of processes and of micro-batches changes no random number.

Legend: B global batch, b per-rank batch (train or eval), m micro-batch (b / accum_steps),
N images of a dataset, C channels, H/W image height/width, L classes (logits), E experts of a
layer; ``_5`` / ``_3``: the step's [loss, ce, aux, correct, images] and eval's [loss, correct,
images] sums.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..balance import update_expert_biases
from ..keyed import draw_sample_keys, sample_keys
from ..layer import MoE
from ..parallel import clip_grad_norm_, equal_batches, moe_set_seed, no_sync, parallelize
from ..parallel.layout import mix_seed
from . import checkpoint, progress, report, rundir
from .augment import Augmenter, Draws
from .config import ConfigError, TrainConfig
from .data import epoch_order, load_dataset, rank_batch, steps_per_epoch
from .dist import all_reduce_, grad_scaler, on_every_rank
from .evaluate import autocast, evaluate
from .init_from import find_init, load_init, model_changes, setting_changes
from .meters import RoutingMeter
from .optim import WarmupCosine, make_optimizer
from .setup import (build_model, check_kernels, device_for, init_for_restarts, launcher,
                    maybe_fault, precision_for, record_model_module, set_threads, start_processes)
from .stops import StopRequests

BAR_EVERY = 10  # steps between progress-bar updates (each reads the device's running sums)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: says where the run stopped and how to continue it."""


class Trainer:
    """One run: ``Trainer(cfg, run_dir, resume).run()`` returns summary.json's dict."""

    def __init__(self, cfg: TrainConfig, run_dir: Optional[str] = None,
                 resume: Optional[str] = None):
        if cfg.plots and importlib.util.find_spec("matplotlib") is None:
            warnings.warn("plots=True but matplotlib is not installed (pip install "
                          "'moesaic[train]'): training without plots", stacklevel=2)
            cfg = dataclasses.replace(cfg, plots=False)
        cfg = record_model_module(cfg)  # a model the config file registered: its file
        init_ckpt = None
        if cfg.upcycle and cfg.init_from is None and resume is None:
            raise ConfigError("upcycle=True needs init_from: the checkpoint (or run dir) of the "
                              "dense model to upcycle")
        if cfg.init_from is not None and resume is None:  # found before anything is written
            init_ckpt = find_init(cfg.init_from)
            cfg = dataclasses.replace(cfg, init_from=os.path.abspath(cfg.init_from))
        self.cfg = cfg
        init_for_restarts(cfg.timeout_s)
        self.ctx = start_processes(cfg)
        self.rank, self.world, self.is_main = self.ctx.rank, self.ctx.world_size, self.ctx.is_main
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the world size "
                              f"({self.world}): each rank takes an equal slice of every batch")
        if (cfg.batch_size // self.world) % cfg.accum_steps:
            raise ConfigError(f"accum_steps ({cfg.accum_steps}) must divide each rank's share of "
                              f"the batch ({cfg.batch_size} / {self.world} processes = "
                              f"{cfg.batch_size // self.world}): micro-batches are equal")
        m = cfg.batch_size // self.world // cfg.accum_steps
        if (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and m % 2 and m < cfg.batch_size:
            warnings.warn(f"mixup/cutmix pair images 2j and 2j + 1 of the global batch, but each "
                          f"micro-batch holds an odd number of images ({m}): pairs that straddle "
                          f"two are not mixed, so this run mixes differently from the same run "
                          f"on another number of processes or micro-batches", stacklevel=2)
        set_threads(cfg)
        self.device = device_for(cfg, self.ctx)
        self.amp_dtype = precision_for(cfg, self.device)
        train_set, test_set = load_dataset(cfg.dataset, cfg.data_dir, cfg.norm_mean, cfg.norm_std)
        self.train_set, self.test_set = train_set.to(self.device), test_set.to(self.device)
        side = min(train_set.shape[1:])
        if cfg.crop_padding >= side:
            warnings.warn(f"crop_padding ({cfg.crop_padding}) is not below the image side "
                          f"({side}): some random crops hold no pixel of the image", stacklevel=2)
        self.spe = steps_per_epoch(len(train_set), cfg.batch_size, cfg.steps_per_epoch)
        moe_set_seed(cfg.seed)
        model = build_model(cfg, train_set.shape, train_set.num_classes).to(self.device)
        check_kernels(model, self.device)
        # init_from's weights are loaded (and checked, on every rank) before anything is
        # written; a torchrun restart resumes its own checkpoint instead, so it loads them
        # only if it finds none
        init_notes = None

        def load_from_init():
            return load_init(cfg, model, init_ckpt, self._inputs())

        if init_ckpt is not None and rundir.restart_count() == 0:
            init_notes = on_every_rank(load_from_init)
        own_dir = None  # the run dir the resumed checkpoint belongs to
        if resume is not None:
            parent = os.path.dirname(os.path.abspath(checkpoint.find(resume)))
            if os.path.basename(parent) == "checkpoints":
                own_dir = os.path.dirname(parent)
        run_dir = run_dir if run_dir is not None else own_dir  # continue in the checkpoint's dir
        resuming = own_dir is not None and os.path.abspath(run_dir) == own_dir
        self.run_dir, again = rundir.shared_choice(cfg.runs_root, cfg.name, run_dir, self.is_main,
                                                   resuming=resuming)
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        ckpt = checkpoint.latest_in(self.run_dir) if again else None
        if ckpt is None and resume is not None:
            ckpt = checkpoint.find(resume)
        if ckpt is None and init_ckpt is not None:  # a resumed run has its own weights
            if init_notes is None:  # a restart that found no checkpoint of its own
                init_notes = on_every_rank(load_from_init)
            self.log(init_notes[0])
            if self.is_main:
                for note in init_notes[1]:
                    warnings.warn(note, stacklevel=3)
        self.model = parallelize(model, dedup_tokens=cfg.dedup_tokens)
        self.moe_names = [n for n, m in self.model.named_modules() if isinstance(m, MoE)]
        self.ep_sizes = sorted({m.layout.ep_size for m in self.model.modules()
                                if isinstance(m, MoE)})  # the experts' parallel sizes
        self.routing = RoutingMeter()
        self.stops = StopRequests()
        self.opt = make_optimizer(self.model, cfg)
        self.sched = WarmupCosine(self.opt, cfg.lr, cfg.min_lr, round(cfg.warmup_epochs * self.spe),
                                  cfg.epochs * self.spe, cfg.schedule)
        self.scaler = grad_scaler(self.amp_dtype == torch.float16)
        self.augment = Augmenter(cfg, train_set.mean, train_set.std)
        self.params_total, self.params_active = models.count_parameters(self.model)
        self.epoch, self.step, self.history = 0, 0, []
        self.initial_eval: Optional[dict] = None  # eval_at_start's result
        self.last_ckpt: Optional[str] = None
        if ckpt is not None:
            self._load(ckpt)

    def log(self, msg: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            try:
                tqdm.write(msg)
            except BrokenPipeError:  # `| head` ended: train on, the run dir has the record
                _to_devnull(sys.stdout)
                try:
                    print("moesaic: stdout was closed (the reader of a pipe ended); training "
                          f"goes on, writing to {getattr(self, 'run_dir', 'its run dir')}",
                          file=sys.stderr)
                except BrokenPipeError:  # `2>&1 | head`: stderr was that pipe too
                    _to_devnull(sys.stderr)

    def _load(self, ckpt: str) -> None:
        try:
            state = checkpoint.load(ckpt, self.model, self.opt, self.rank, self.world)
        except checkpoint.ModelMismatch as e:  # name what this run changed, if anything
            changed = None
            with contextlib.suppress(Exception):  # the first error stands on its own
                changed = model_changes(checkpoint.read_state(ckpt).get("config", {}),
                                        self.cfg.to_dict())
            if not changed:
                raise
            raise checkpoint.CheckpointError(
                f"{e}\nthis run's model differs from the checkpoint's: {'; '.join(changed)} "
                "(resume without those overrides)") from e
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.sched.load_state_dict(state["scheduler"])
        at = self.epoch * self.spe  # checkpoints end epochs: the schedule goes by epochs
        if self.sched.last_step != at:
            self.log(f"steps per epoch changed ({self.sched.last_step} steps for {self.epoch} "
                     f"epochs, now {self.spe} per epoch): the lr schedule continues from the "
                     f"end of epoch {self.epoch} in the new steps")
            self.sched.load_state_dict({"last_step": at})
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state.get("history", []))[: self.epoch]
        self.initial_eval = state.get("initial_eval")
        self.last_ckpt = ckpt
        self.log(f"resumed from {ckpt} (epoch {self.epoch}, step {self.step})")
        was = state.get("world_size")
        if was is not None and was != self.world:
            self.log(f"the checkpoint trained on {was} process(es), this run on {self.world}: "
                     f"per-rank capacity and balance losses now see {self.world}-way shards "
                     f"(the 'global' scopes do not), and throughput counts from here")
        settings = setting_changes(state.get("config", {}), self.cfg.to_dict())
        if settings:
            self.log(f"resumed with other settings from here on: {', '.join(settings)}")
        changed = model_changes(state.get("config", {}), self.cfg.to_dict())
        if changed and self.is_main:
            warnings.warn(f"resuming {ckpt} with another model ({'; '.join(changed)}): its "
                          "weights loaded because the shapes fit, but the model differs from "
                          "the one that trained them", stacklevel=2)
        in_this_run = os.path.dirname(os.path.abspath(ckpt)) == os.path.abspath(self.ckpt_root)
        if self.is_main and in_this_run:  # resumed from an earlier one: --resume RUN_DIR follows
            checkpoint.point_latest(ckpt, self.epoch)
            checkpoint.point_best(ckpt, self.epoch, self.history)
        if self.epoch >= self.cfg.epochs:
            self.log(f"the checkpoint has finished epoch {self.epoch} of epochs={self.cfg.epochs}:"
                     f" nothing to train (--set epochs=N with N > {self.epoch} trains longer)")

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "history": self.history, "config": self.cfg.to_dict(), "world_size": self.world,
                "inputs": self._inputs(), "initial_eval": self.initial_eval}

    def _inputs(self) -> dict:
        """The dataset and the normalisation it resolved to (None in the config: computed)."""
        return {"dataset": self.cfg.dataset, "norm_mean": list(self.train_set.mean),
                "norm_std": list(self.train_set.std)}

    def _loss(self, logits_bL, labels_b, partner_labels_b, lam):
        """(cross-entropy, correct count), both mixed ``lam : 1 - lam`` between the labels and
        the mixup/cutmix partners' labels."""
        ls = self.cfg.label_smoothing
        logits_bL = logits_bL.float()
        ce = F.cross_entropy(logits_bL, labels_b, label_smoothing=ls)
        if lam < 1.0:
            ce_partner = F.cross_entropy(logits_bL, partner_labels_b, label_smoothing=ls)
            ce = lam * ce + (1 - lam) * ce_partner
        pred_b = logits_bL.argmax(-1)
        correct = lam * (pred_b == labels_b).sum()
        correct = correct + (1 - lam) * (pred_b == partner_labels_b).sum()
        return ce, correct

    def _micro_inputs(self, idx_m: torch.Tensor, start: int):
        """Augmented images and labels of the micro-batch of global images [start, start + m):
        the step's streams are seeded by (seed, step) alone and draw for the whole global batch,
        so an image is augmented alike on any rank, in any micro-batch."""
        cfg = self.cfg
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(cfg.seed, self.step, 0xA06))
        rng = np.random.default_rng([cfg.seed, self.step, 0x313])
        return self.augment(self.train_set.images_NCHW[idx_m], self.train_set.labels_N[idx_m],
                            Draws(gen, cfg.batch_size, start), rng, start)

    def _sample_keys(self) -> torch.Tensor:
        """This step's int32 key of every image of the global batch, from (seed, step)."""
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, 0x5EED))
        return draw_sample_keys(self.cfg.batch_size, gen).to(self.device)

    def _stop_not_finite(self, sums_5: torch.Tensor, batch_in_epoch: int) -> None:
        where = (f"at step {self.step + 1} (epoch {self.epoch + 1}, batch {batch_in_epoch + 1} "
                 f"of {self.spe})")
        keep = (f"the last good checkpoint, {self.last_ckpt}, is left intact" if self.last_ckpt
                else "no checkpoint had been written yet")
        loss_now = float(sums_5[0] / sums_5[4])
        fp32 = "" if self.amp_dtype is None else " or precision='fp32'"
        raise NonFiniteLoss(f"non-finite loss ({loss_now}) {where}; stopping before applying "
                            f"this step: {keep}. Try a lower lr, a longer warmup{fp32}.")

    def train_step(self, idx_b: torch.Tensor, batch_in_epoch: int) -> torch.Tensor:
        """One optimizer step on this rank's images ``idx_b`` (in ``accum_steps`` micro-batches,
        gradients synchronised once, after the last); returns the global [loss, ce, aux,
        correct, images] of the step, still on the device."""
        cfg, dev = self.cfg, self.device
        self.opt.zero_grad(set_to_none=True)
        micros = idx_b.chunk(cfg.accum_steps)
        local_6 = torch.zeros(6, device=dev)  # the step's sums, and a stop request
        keys_B = self._sample_keys()
        start = self.rank * idx_b.numel()
        for j, idx_m in enumerate(micros):
            x_mCHW, labels_m, partner_labels_m, lam = self._micro_inputs(idx_m, start)
            keys_m = keys_B[start:start + idx_m.numel()]
            start += idx_m.numel()
            with contextlib.ExitStack() as stack:
                stack.enter_context(sample_keys(keys_m))  # through the backward (recomputation)
                if j < len(micros) - 1:  # accumulate locally; the last backward syncs the ranks
                    stack.enter_context(no_sync(self.model))
                with self._autocast(), equal_batches(self.model):  # equal micro-batches
                    logits_mL, aux, stats = self.model(x_mCHW, return_stats=True)
                self.routing.step(stats)
                ce, correct = self._loss(logits_mL, labels_m, partner_labels_m, lam)
                loss = ce + aux.float()
                n = float(idx_m.numel())
                local_6[:5] += torch.stack([loss.detach() * n, ce.detach() * n,
                                            aux.detach().float() * n, correct.float(),
                                            torch.tensor(n, device=dev)])
                self.scaler.scale(loss / len(micros)).backward()  # / 1 is exact
        local_6[5] = float(self.stops.requested)
        sums_6 = all_reduce_(local_6)
        sums_5 = sums_6[:5]
        # The one host read per step, on purpose: every rank sees the all-reduced sums, so all
        # stop together, before applying the step, on a non-finite loss or any rank's signal.
        finite, asked = torch.stack([torch.isfinite(sums_5[:3]).all(), sums_6[5] > 0]).tolist()
        if asked:
            raise KeyboardInterrupt
        if not finite:
            self._stop_not_finite(sums_5, batch_in_epoch)
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.opt)
            clip_grad_norm_(self.model, cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        update_expert_biases(self.model)  # auxiliary-loss-free balancing (a no-op without it)
        self.sched.step()
        self.step += 1
        maybe_fault(self.step, self.rank)
        return sums_5

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(loss, accuracy) on the test set (see :func:`moesaic.train.evaluate.evaluate`)."""
        return evaluate(self.model, self.test_set, self.cfg.eval_batch_size, self.rank,
                        self.world, self.device, self.amp_dtype,
                        progress=self.is_main and self.cfg.progress)

    def train_epoch(self):
        """One epoch of steps. Loss/accuracy sums and routing statistics stay on the device; the
        progress bar reads them every ``BAR_EVERY`` steps and at the end of the epoch."""
        cfg = self.cfg
        order_N = epoch_order(len(self.train_set), self.epoch, cfg.seed).to(self.device)
        self.routing.reset()
        totals_5 = torch.zeros(5, dtype=torch.float64, device=self.device)
        bar = progress.bar(self.spe, f"epoch {self.epoch + 1}/{cfg.epochs}", "step",
                           self.is_main and cfg.progress)
        shown_5, shown_steps = torch.zeros(5, dtype=torch.float64), 0
        t0, stopped, steps = time.perf_counter(), False, 0
        with bar:  # closed on an interrupt too, so the error line starts a line of its own
            for i in range(self.spe):
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stopped = True
                    break
                idx_b = rank_batch(order_N, i, cfg.batch_size, self.rank, self.world)
                totals_5 += self.train_step(idx_b, i)
                steps += 1
                if bar.disable or (steps % BAR_EVERY and i + 1 < self.spe):
                    continue
                now_5 = totals_5.cpu().clone()  # on a CPU run .cpu() is totals_5 itself
                recent_5 = now_5 - shown_5
                rate = float(now_5[4]) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(recent_5[0] / recent_5[4]):.4f}",
                                acc=f"{100 * float(now_5[3] / now_5[4]):.1f}%",
                                img_s=f"{rate:.0f}", refresh=False)
                bar.update(steps - shown_steps)
                shown_5, shown_steps = now_5, steps
        train_time = time.perf_counter() - t0
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            stopped = True
        return totals_5.tolist(), train_time, steps, stopped

    def run(self) -> dict:
        cfg = self.cfg
        done = (self.epoch >= cfg.epochs
                or (cfg.max_steps is not None and self.step >= cfg.max_steps))
        if self.is_main and not done:  # a resume with nothing to train keeps them
            report.write_json(os.path.join(self.run_dir, "config.json"), cfg.to_dict())
            report.write_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.history)
            self.log(models.describe(self.model))
            self.log(f"run dir {self.run_dir}; {self.world} process(es), device {self.device}, "
                     f"precision {self._precision_words()}, ep_size {self.ep_sizes or '-'}, "
                     f"{self.spe} steps/epoch of {cfg.batch_size} images")
        try:
            with self.stops.deferred():
                if cfg.eval_at_start and self.step == 0:
                    self._eval_at_start()
                    self._stop_if_asked()
                elif cfg.eval_at_start and self.initial_eval is None:
                    self.log(f"eval_at_start: not evaluated, the run resumes at step {self.step}")
                return self._run_epochs()
        except KeyboardInterrupt:
            where = (f"continue with: {launcher()} --resume {self.run_dir} (from {self.last_ckpt})"
                     if self.last_ckpt else "no checkpoint had been written yet")
            raise TrainingInterrupted(f"interrupted at step {self.step} (epoch {self.epoch + 1}); "
                                      f"{where}") from None

    def _heavy_drop_note(self, dropped: float) -> str:
        """Once per run: most of the routing was dropped, and what would keep it."""
        configs = [m.config for m in self.model.modules() if isinstance(m, MoE)]
        dropless_ok = all(c.router == "token_choice" and c.capacity_scope == "batch"
                          for c in configs)
        return (f"note: the MoE layers dropped {100 * dropped:.0f}% this epoch (assignments "
                "past an expert's capacity, or tokens no expert chose); raise "
                "model_args.capacity_factor"
                + (", or set model_args.drop_tokens=False" if dropless_ok else ""))

    def _stop_if_asked(self) -> None:
        """Between steps: every rank raises KeyboardInterrupt if any rank was signalled."""
        asked = all_reduce_(torch.tensor([float(self.stops.requested)], device=self.device))
        if float(asked[0]) > 0:
            raise KeyboardInterrupt

    def _precision_words(self) -> str:
        """The precision in the config's spelling (``bf16``), ``(auto)`` when it chose it."""
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
        return name + (" (auto)" if self.cfg.precision == "auto" else "")

    def _eval_at_start(self) -> None:
        """The test set before any step: where a fine-tuned or upcycled model starts. Eval
        draws no random numbers, so the training that follows is unchanged."""
        loss, acc = self.evaluate()
        self.initial_eval = {"initial_eval_loss": loss, "initial_eval_accuracy": acc}
        self.log(f"before training: eval loss {loss:.4f} acc {100 * acc:.2f}%")

    def _summary(self) -> dict:
        return {**report.summary(self.history, self.params_total, self.params_active),
                "world_size": self.world, "device": self.device.type, "ep_size": self.ep_sizes,
                **(self.initial_eval or {})}

    def _run_epochs(self) -> dict:
        cfg = self.cfg
        summary = None
        while self.epoch < cfg.epochs:
            totals, train_time, steps, stopped = self.train_epoch()
            if steps == 0:
                self.log(f"max_steps={cfg.max_steps} already reached at step {self.step}: "
                         f"nothing to train (--set max_steps=None, or a larger value, trains on)")
                break
            partial = steps < self.spe  # max_steps stopped it inside the epoch
            t1 = time.perf_counter()
            eval_loss, eval_acc = self.evaluate()
            eval_time = time.perf_counter() - t1
            if not partial:
                self.epoch += 1
            best = max([r["eval_accuracy"] for r in self.history] + [eval_acc])
            is_best = not self.history or eval_acc > max(r["eval_accuracy"] for r in self.history)
            moe = self.routing.result(self.moe_names)
            n = float(totals[4])
            rec = {
                "epoch": self.epoch + int(partial), "step": self.step, "lr": self.sched.lr,
                "train_loss": float(totals[0]) / n, "train_ce": float(totals[1]) / n,
                "train_aux": float(totals[2]) / n, "train_accuracy": float(totals[3]) / n,
                "eval_loss": eval_loss, "eval_accuracy": eval_acc, "best_eval_accuracy": best,
                "images_per_second": n / train_time if train_time > 0 else 0.0,
                "train_images": int(n), "train_time_s": train_time, "eval_time_s": eval_time,
                "world_size": self.world, "ep_size": self.ep_sizes,
                "dropped_fraction": (float(np.mean([m["dropped_fraction"] for m in moe]))
                                     if moe else None),
                "moe": moe,
            }
            if partial:
                rec["partial_steps"] = steps
            self.history.append(rec)
            last = self.epoch >= cfg.epochs or stopped
            if not partial and (last or is_best or self.epoch % cfg.checkpoint_every == 0):
                self.last_ckpt = checkpoint.save(self.ckpt_root, self.epoch, self.model, self.opt,
                                                 self._state(), self.is_main, is_best,
                                                 cfg.keep_checkpoints) or self.last_ckpt
            summary = self._summary()
            if self.is_main:  # the line first: an interrupt while plotting still shows it
                self._write_epoch(summary, rec)
            earlier = [r.get("dropped_fraction") or 0 for r in self.history[:-1]]
            if (rec["dropped_fraction"] or 0) > 0.5 and max(earlier, default=0) <= 0.5:
                self.log(self._heavy_drop_note(rec["dropped_fraction"]))
            if partial:
                self.log(self._partial_note(steps))
            elif stopped and self.epoch < cfg.epochs:
                self.log(f"stopped by max_steps={cfg.max_steps} at the end of epoch {self.epoch} "
                         f"of {cfg.epochs}; --resume {self.run_dir} --set max_steps=None trains "
                         f"on from its checkpoint")
            if stopped:
                break
            if self.epoch < cfg.epochs:  # asked during the evaluation or the checkpoint?
                self._stop_if_asked()
        if summary is None and self.history:
            summary = self._summary()
        if self.is_main and summary is not None:
            self.log(report.end_table(summary, self.history, self.run_dir))
        return summary or {}

    def _partial_note(self, steps: int) -> str:
        """What a max_steps stop inside an epoch leaves: its metrics, but no checkpoint, so a
        resumed run redoes the whole epoch and stays exact."""
        where = (f"--resume {self.run_dir} --set max_steps=None continues from the latest "
                 f"checkpoint ({self.last_ckpt}) and redoes the epochs after it exactly"
                 if self.last_ckpt else
                 "no checkpoint had been written, so a new run starts from scratch")
        return (f"stopped by max_steps={self.cfg.max_steps} after {steps} of {self.spe} steps of "
                f"epoch {self.epoch + 1}: this partial epoch is evaluated and recorded but not "
                f"checkpointed; {where}")

    def _write_epoch(self, summary: dict, rec: dict) -> None:
        d = self.run_dir
        report.write_metrics(os.path.join(d, "metrics.jsonl"), self.history)
        report.write_json(os.path.join(d, "summary.json"), summary)
        self.log(report.epoch_line(rec, self.cfg.epochs))
        if self.cfg.plots:
            report.plot_curves(os.path.join(d, "curves.png"), self.history)
            report.plot_expert_load(os.path.join(d, "expert_load.png"), self.history)


def _to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null (its reader went away)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def train(cfg: TrainConfig, run_dir: Optional[str] = None, resume: Optional[str] = None) -> dict:
    """Run training as configured; returns the summary (also written to summary.json)."""
    return Trainer(cfg, run_dir, resume).run()


__all__ = ["train", "Trainer", "NonFiniteLoss", "TrainingInterrupted"]
