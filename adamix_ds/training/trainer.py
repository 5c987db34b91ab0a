"""`Trainer`: the loop every method shares, top to bottom: set up, train, evaluate, checkpoint, export.

It holds the arguments, the DeepSpeed config and batch plan, data and its step sampler, the base model,
the loop, evaluation, checkpoint publishing and resuming, logging and run.json. A family says what it
trains, how a step is made, what its checkpoint holds and what it exports: `ReplicatedTrainer`
(replicated_trainer.py) with its two families `AdaMixTrainer` and `RoutedTrainer`, and `FullTrainer`
(full_trainer.py). recipe.train picks one by the method's family.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GenerationConfig

from .. import distributed
from ..arguments import DataArguments, ModelArguments, TrainArguments
from ..config import MixtureConfig
from ..data.batching import StepSampler, collate
from ..data.slot_accuracy import meaning_of, slot_accuracy
from ..data.tokenization import train_eval_datasets
from ..data.tokenizer import load_tokenizer, use_chat_template
from ..distributed.ds_config import BatchPlan, load_ds_config, resolve_ds_config
from ..distributed.sharded_base import enable_activation_checkpointing, load_base
from ..distributed.storage import StorageError
from ..export.generation import complete, complete_batch, prompt_of
from ..hashing import counter_hash
from ..methods.accounting import ParameterCount
from . import preflight
from .checkpoints import TrainerState, find_resume_checkpoint, read_trainer_state, save_checkpoint, what_survives
from .monitoring import Monitor, peak_memory_gb
from .termination import StopRequested, TerminationRequest, TrainingInterrupted

logger = logging.getLogger("adamix_ds")

SCORING_BATCH = 50
"""Prompts decoded together per rank for --slot_accuracy (--per_device_eval_batch_size overrides)."""


def total_steps(args: TrainArguments, num_examples: int, plan: BatchPlan) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.floor(args.num_train_epochs * (num_examples // plan.global_batch)))


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of dropout at one step on one rank: resumed runs draw the same masks."""
    return counter_hash(seed, step, rank) & ((1 << 63) - 1)


class Trainer:
    """Built and run identically on every rank; subclasses say what is trained."""

    trainable_base = False
    parameter_count: ParameterCount

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, mixture_config: MixtureConfig,
                 args: TrainArguments) -> None:
        self.model_args, self.data_args, self.mixture_config, self.args = model_args, data_args, mixture_config, args
        self.output_dir = Path(args.output_dir)
        self.termination = TerminationRequest()  # first: a stop during set-up is honoured after the first step
        self.eval_modes = preflight.resolve_eval_modes(mixture_config, args.eval_modes)

        self.seed = distributed.broadcast_int(args.seed)
        raw_ds_config = load_ds_config(args.deepspeed)
        preflight.check_ds_keys(raw_ds_config, args.deepspeed)
        resolve_ds_config(raw_ds_config, args, distributed.world_size(), steps_for=lambda plan: 1)  # checks only
        preflight.check_output_dir(args.output_dir)
        preflight.check_method_options(mixture_config, args)
        preflight.check_training_values(args)
        preflight.check_quantization(model_args, mixture_config)
        preflight.check_model(model_args, mixture_config, args.gradient_checkpointing)
        self.tokenizer = load_tokenizer(model_args)
        use_chat_template(self.tokenizer, data_args.chat_template)
        self.train_data, self.eval_data = train_eval_datasets(data_args, self.tokenizer, self.seed)
        world = distributed.world_size()
        self.ds_config, self.plan = resolve_ds_config(
            raw_ds_config, args, world, lambda plan: total_steps(args, len(self.train_data), plan)
        )
        self.total_steps = total_steps(args, len(self.train_data), self.plan)
        self.sampler = StepSampler(len(self.train_data), self.plan, self.seed)
        logger.info(self.plan.describe(data_args.max_seq_length))
        logger.info("%d training examples, %d steps (%d per epoch)", len(self.train_data), self.total_steps,
                    self.sampler.steps_per_epoch)
        self.base = load_base(model_args, self.ds_config, vocab_size=len(self.tokenizer), seed=args.seed,
                              trainable=self.trainable_base)
        self.model = self.base.model
        if args.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.generating_on = self.model
        """Where the mixtures are attached: the base, or the whole copy that the samples and scoring use."""
        self.step = 0
        self.resumed_step: int | None = None
        self.history: list[dict] = []
        self.monitor = Monitor(self.ds_config, self.output_dir, self.total_steps)

    # What a family provides.
    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        raise NotImplementedError

    def write_checkpoint(self, directory: Path) -> dict:
        """Collective: write this family's state into `directory`; return what trainer_state.json adds."""
        raise NotImplementedError

    def collective_checkpoint_bytes(self) -> int | None:
        """Where write_checkpoint runs collectives of its own (DeepSpeed's engine checkpoint): the bytes this rank
        writes, checked as free space before it starts; None where its failures are exchanged instead."""
        return None

    def load_checkpoint(self, path: Path, record: dict) -> None:
        """Restore the state `write_checkpoint` wrote (record: the checkpoint's trainer_state.json)."""
        raise NotImplementedError

    def export(self) -> dict:
        """The merged outputs after training (collective)."""
        raise NotImplementedError

    def eval_mode_names(self) -> list[str]:
        """The names of the evaluations run at each eval (eval/<name>/loss)."""
        raise NotImplementedError

    def eval_sums(self, batch: dict, rows: list[int], mode: str) -> tuple[int, float]:
        """(target tokens, summed cross-entropy) of one evaluation batch of eval-set `rows` in `mode`."""
        raise NotImplementedError

    def verify(self) -> None:
        """Checks before the final checkpoint (collective)."""

    def rerun_export(self) -> str:
        """How to write the export again from the final checkpoint (a failure's message says it)."""
        return ("rerun the same command with --resume_from_checkpoint auto (it resumes at the last step and only "
                "evaluates and exports)")

    # Shared by every method.
    def batch(self, rows: list[int], data) -> dict:
        return {k: v.to(self.base.device) for k, v in collate([data[i] for i in rows],
                                                               self.tokenizer.pad_token_id).items()}

    def step_rows(self, micro: int) -> list[int]:
        return self.sampler.rows(self.step, micro, distributed.rank())

    def seed_step(self) -> None:
        torch.manual_seed(step_seed(self.seed, self.step, distributed.rank()))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean eval loss per mode; the eval set is split across ranks and the sums all-reduced."""
        if self.eval_data is None:
            return {}
        batches = self.rank_batches(self.args.per_device_eval_batch_size or self.plan.micro_batch)
        self.model.eval()
        metrics = {}
        for mode in self.eval_mode_names():
            sums = torch.zeros(2, dtype=torch.float64)
            for rows in batches:
                keys = rows or [0]  # a rank out of rows runs a batch that counts no token
                batch = self.batch(keys, self.eval_data)
                if not rows:
                    batch["labels"].fill_(-100)
                sums += torch.tensor(self.eval_sums(batch, keys, mode), dtype=torch.float64)
            sums = distributed.all_reduce_sum(sums).cpu()
            loss = sums[1].item() / max(sums[0].item(), 1.0)
            metrics[f"eval/{mode}/loss"] = loss
            metrics[f"eval/{mode}/perplexity"] = math.exp(min(loss, 50.0))
        return metrics

    def rank_batches(self, size: int) -> list[list[int]]:
        """This rank's eval-set rows in batches of `size`. Under ZeRO-3 every rank must run the same number of
        forwards, so every rank gets as many batches; a rank out of rows gets empty ones."""
        rank, world = distributed.rank(), distributed.world_size()
        mine = list(range(rank, len(self.eval_data), world))
        count = math.ceil(math.ceil(len(self.eval_data) / world) / size)
        return [mine[b * size:(b + 1) * size] for b in range(count)]

    def extra_metrics(self) -> dict:
        """Method-specific scalars added at each logging step."""
        return {}

    @contextlib.contextmanager
    def serving(self, mode: str, rows: list[int]):
        """Within the block the model serves as `mode` (one of served_modes()) for a batch of eval-set `rows`."""
        yield

    def attach_mixtures(self, model) -> None:
        """Move what is trained beside the base (the mixtures' hooks) onto `model`; nothing for --method full."""

    @contextlib.contextmanager
    def generation_model(self):
        """The model the samples and the scoring generate with: under ZeRO-3 a whole copy gathered once where it fits
        (ShardedBase.whole), the mixtures moved onto it for the block; a stop is checked before its forwards too."""
        with self.base.whole() as model:
            if model is self.model:
                yield model
                return
            self.generating_on = model
            self.attach_mixtures(model)
            try:
                with self.termination.checked_before_each_forward(getattr(model, "base_model", model)):
                    yield model
            finally:
                self.generating_on = self.model
                self.attach_mixtures(self.model)

    def served_modes(self) -> list[str]:
        """What the end-of-run slot accuracy compares: each eval mode (methods with a base to compare add it)."""
        return self.eval_mode_names()

    @torch.no_grad()
    def score_slots(self) -> dict[str, float]:
        """--slot_accuracy: the percent of attribute values realised by greedy outputs for every held-out prompt, in
        each served mode. Each rank decodes its share in batches, all ranks as many (ZeRO-3 generates together)."""
        if not self.args.slot_accuracy or self.eval_data is None:
            return {}
        prompts = [prompt_of(self.eval_data[i])[0] for i in range(len(self.eval_data))]
        texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        if not any(meaning_of(text) for text in texts):
            logger.warning("--slot_accuracy: no held-out prompt holds attributes like name[...]; not scored")
            return {}
        batches = self.rank_batches(self.args.per_device_eval_batch_size or SCORING_BATCH)
        config = GenerationConfig(max_new_tokens=self.args.sample_max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        self.model.eval()
        scores = {}
        with self.generation_model() as model:
            for mode in self.served_modes():
                outputs = {}
                for rows in batches:
                    keys = rows or [0]  # a rank out of rows decodes one prompt and drops it
                    with self.serving(mode, keys):
                        decoded = complete_batch(model, self.tokenizer, [prompts[i] for i in keys], config,
                                                 synced=distributed.world_size() > 1)
                    outputs.update(zip(rows, decoded))
                for part in distributed.all_gather_objects(outputs):
                    outputs.update(part)
                scores[mode] = slot_accuracy(texts, [outputs[i] for i in range(len(prompts))])
        logger.info("slot accuracy on %d held-out inputs: %s", len(prompts),
                    ", ".join(f"{mode} {score:.1f}%" for mode, score in scores.items()))
        return scores

    def save(self) -> None:
        """Collective: OUTPUT_DIR/checkpoints/step-N, published atomically the same way for every family."""
        state = TrainerState(step=self.step, routing_seed=self.seed, consumed_examples=self.step * self.plan.global_batch)
        path = save_checkpoint(self.output_dir, state, self.write_checkpoint, self.args.save_total_limit,
                               self.collective_checkpoint_bytes())
        logger.info("saved checkpoint %s", path)

    def resume(self) -> None:
        """--resume_from_checkpoint: refuse a checkpoint of another seed or batch plan, then restore it."""
        path = find_resume_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "auto":
                logger.info("no checkpoint under %s; starting from step 0", self.output_dir)
            return
        state, record = read_trainer_state(path)
        state.check_continues(path, self.seed, self.plan.global_batch)
        self.load_checkpoint(path, record)
        self.step = self.resumed_step = state.step
        logger.info("resumed from %s at step %d", path, self.step)

    def _log(self, metrics: dict) -> None:
        self.history.append({"step": self.step, **metrics})
        self.monitor.log(self.step, metrics)

    def run(self) -> dict:
        args = self.args
        self.resume()
        self.monitor.resumed_at(self.step)
        if distributed.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.monitor.hyperparameters(self._configuration())
        if self.step == 0 and args.eval_steps > 0:
            self._log(self.evaluate())
        while self.step < self.total_steps:
            metrics = self.train_step()
            metrics["perf/peak_memory_gb"] = peak_memory_gb()
            self.step += 1
            self.monitor.step_done(self.step, metrics)
            if self.step % max(args.logging_steps, 1) == 0 or self.step == self.total_steps:
                self._log({**metrics, **self.extra_metrics()})
            if self.termination.agreed():
                self.save()
                self.close()
                raise TrainingInterrupted(f"stopped by {self.termination.cause} after step {self.step}; checkpoint saved under "
                                          f"{self.output_dir / 'checkpoints'}; continue with "
                                          "--resume_from_checkpoint auto")
            if args.eval_steps > 0 and self.step % args.eval_steps == 0 and self.step < self.total_steps:
                self._log(self.evaluate())
            if args.save_steps > 0 and self.step % args.save_steps == 0 and self.step < self.total_steps:
                self.save()
        skipped: list[str] = []
        final = self._unless_stopped("the final evaluation", self.evaluate, skipped) or {}
        if final:
            self._log(final)
        self.verify()
        if self.step != self.resumed_step:  # resumed at the end (an export to redo): that checkpoint is the final one
            self.save()
        self.base.release_gathered()
        try:
            merged = self.export() if args.merge_at_end else {}
        except StorageError as error:
            raise StorageError(f"{error}; {what_survives(self.output_dir)}; free space, then "
                               f"{self.rerun_export()}") from None
        samples = self._unless_stopped("the samples", self.write_samples, skipped) or []
        slots = self._unless_stopped("the slot accuracy", self.score_slots, skipped) or {}
        summary = {"final_step": self.step, "final_eval": final, "merged": merged, "samples": samples,
                   "parameters": self.parameter_count.to_dict(), **({"slot_accuracy": slots} if slots else {}),
                   **({"skipped": skipped} if skipped else {})}
        self._write_run_json(summary)
        self.close()
        if skipped:
            raise TrainingInterrupted(f"stopped by {self.termination.cause} after the last step; the checkpoint "
                                      f"and the export are written under {self.output_dir}; skipped: "
                                      f"{', '.join(skipped)}")
        self._report_outputs(merged, final, slots)
        return summary

    def _unless_stopped(self, what: str, work, skipped: list[str]):
        """work() unless a stop was requested before or during it (then None, and `what` joins `skipped`): after the
        last step, a SIGTERM ends evaluation and generation between two forwards instead of after minutes of them."""
        if not skipped:
            try:
                with self.termination.checked_before_each_forward(getattr(self.model, "base_model", self.model)):
                    return work()
            except StopRequested:
                self.base.release_gathered()  # a forward was cut short: its prefetched weights go back
                logger.warning("stopped by %s during %s", self.termination.cause, what)
        skipped.append(what)
        return None

    def write_samples(self) -> list[dict]:
        """Greedy generations for the first --num_samples held-out prompts (every rank generates together)."""
        if self.args.num_samples <= 0 or self.eval_data is None:
            return []
        self.model.eval()
        rows = [prompt_of(self.eval_data[i]) for i in range(min(self.args.num_samples, len(self.eval_data)))]
        config = GenerationConfig(max_new_tokens=self.args.sample_max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        with self.generation_model() as model:
            texts = complete(model, self.tokenizer, [p for p, _ in rows], config, synced=distributed.world_size() > 1)
        decode = self.tokenizer.decode
        samples = [{"prompt": decode(p, skip_special_tokens=True), "reference": decode(r, skip_special_tokens=True),
                    "generated": text} for (p, r), text in zip(rows, texts)]
        if distributed.is_main():
            path = self.output_dir / "samples.jsonl"
            path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            for sample in samples:
                logger.info("sample: %s\n  generated: %s\n  reference: %s", sample["prompt"], sample["generated"],
                            sample["reference"])
        return samples

    def _report_outputs(self, merged: dict, final: dict, slots: dict) -> None:
        """The closing summary a newcomer reads: what changed, where each output is, what to try next."""
        results = []
        first = next((h for h in self.history if any(k.endswith("/loss") and k.startswith("eval/") for k in h)), None)
        for mode in self.eval_mode_names():
            key = f"eval/{mode}/loss"
            if key in final:
                start = f"{first[key]:.2f} at step {first['step']} -> " if first is not None and key in first else ""
                results.append(f"eval loss ({mode}): {start}{final[key]:.2f} at step {self.step}")
        if slots:
            served = [f"{mode} {score:.1f}%" for mode, score in slots.items()]
            results.append("slot accuracy (attribute values the greedy output states, every held-out input): "
                           + " -> ".join(served))
        if results:
            logger.info("results:\n  %s", "\n  ".join(results))
        lines = [f"checkpoints: {self.output_dir / 'checkpoints'}"]
        if self.monitor.log_dir is not None:
            lines.append(f"tensorboard: {self.monitor.log_dir}  (tensorboard --logdir {self.monitor.log_dir})")
        lines += [f"merged {kind}: {path}" for kind, path in merged.items()]
        if self.args.num_samples > 0 and self.eval_data is not None:
            lines.append(f"samples: {self.output_dir / 'samples.jsonl'}")
        lines.append(f"run record: {self.output_dir / 'run.json'}")
        logger.info("outputs:\n  %s", "\n  ".join(lines))
        steps = []
        if self.monitor.log_dir is not None:
            steps.append(f"tensorboard --logdir {self.monitor.log_dir}")
        if "model" in merged:
            prompt = ""
            if self.eval_data is not None and len(self.eval_data):
                text = self.tokenizer.decode(prompt_of(self.eval_data[0])[0], skip_special_tokens=True)
                prompt = f" --prompt {shlex.quote(text)}"
            steps.append(f"python launch/generate.py --model_path {merged['model']}{prompt}")
        steps.append("deepspeed launch/train.py --deepspeed ds_configs/zero3.json --model_name_or_path YOUR_MODEL "
                     "--data_path YOUR_DATA.jsonl   (README: Train on your own model and data)")
        logger.info("next:\n  %s", "\n  ".join(steps))

    def close(self) -> None:
        self.monitor.close()

    def _partition(self) -> dict:
        """Elements of each base weight held by this rank (ceil(numel / W) under ZeRO-3)."""
        return {
            name: (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel())
            for name, p in self.model.named_parameters()
        }

    def _configuration(self) -> dict:
        """The resolved configuration of this run (run.json and TensorBoard's hyper-parameters)."""
        return {
            "arguments": {"model": asdict(self.model_args), "data": asdict(self.data_args),
                          "mixture": self.mixture_config.to_dict(), "train": asdict(self.args)},
            "deepspeed_config": self.ds_config,
            "batch": asdict(self.plan) | {"global_batch": self.plan.global_batch},
            "routing_seed": self.seed,
        }

    def _write_run_json(self, summary: dict) -> None:
        if not distributed.is_main():
            return
        import deepspeed
        import transformers

        from ..version import __version__


        record = {
            **self._configuration(),
            "base_partition": {"world_size": distributed.world_size(), "zero_stage": self.base.stage,
                               "rank0_numel": self._partition()},
            "versions": {"adamix_ds": __version__, "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
            "history": self.history,
            **summary,
        }
        (self.output_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")

