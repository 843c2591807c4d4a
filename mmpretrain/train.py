"""Train a CLIP or SigLIP model on WebDataset shards under DeepSpeed.

    python -m mmpretrain.train configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m mmpretrain.train configs/demo.yaml engine.zero_stage=3
    mmpretrain-train demo                # installed package, no checkout: the bundled configs/demo.yaml

Restarting the same command resumes from ``<output_dir>/checkpoints/latest``.
``--stop-after-steps N`` ends this invocation after N steps with a checkpoint (for time-sliced
jobs); the next invocation of the same command continues where it stopped.

Exit codes: 0 finished (or --stop-after-steps), 2 bad config, 75 stopped on request (SIGUSR1, SIGTERM, Ctrl-C, a
stop file) with a checkpoint saved (rerun to resume), 130 a second Ctrl-C (no save), 1 any other error. An
unexpected error on one rank ends the others: torchrun stops the remaining workers, and a rank waiting on a dead
peer fails within engine.dist_timeout_s.

This module is the command line only (``--help`` imports nothing heavy); the loop is mmpretrain.loop.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train a CLIP or SigLIP model on WebDataset shards under DeepSpeed.

  python -m mmpretrain.train configs/demo.yaml                       # the demo: minutes on 2 CPU cores
  python -m mmpretrain.train configs/demo.yaml train.steps=200 output_dir=outputs/short
  torchrun --nproc_per_node=2 -m mmpretrain.train configs/demo.yaml engine.zero_stage=3
  mmpretrain-train demo                                              # the bundled demo config, no checkout

Running the same command again resumes from <output_dir>/checkpoints/latest."""

# The config's sections and their keys, as the dataclasses of each component define them (each key's meaning
# and unit is the docstring under it there). The resolved config of a run is <output_dir>/config.yaml.
SECTIONS = """\
config (dataclass defaults, then CONFIG, then KEY=VALUE overrides; a dotted key names any value):
  output_dir   the run folder (default outputs/run)
  model        name (a size: tiny, ViT-B-16, siglip-B-16 ...), family, embed_dim, attention, grad_checkpointing,
               lock_image, init_from, trust_pickles (init_from may unpickle), init_logit_scale, init_logit_bias;
               model.vision: image_size, patch_size, width, layers, heads, mlp_dim, act, ln_eps, patch_dropout;
               model.text: kind, hf_config, vocab_size, context_length, width, layers, heads, mlp_dim, act, ln_eps
  data         num_workers, num_streams, max_bad_fraction, bad_min_samples, max_image_pixels, max_member_bytes,
               max_caption_bytes, allow_compressed_tars, decode;
               data.train: urls, sources, resampled, source_weights, samples_per_epoch, shuffle_buffer,
               image_key, text_key, crop_scale, local_crops, local_crop_scale (self-distillation's views);
               data.train.regions (the caption decoder's box tasks): ref_fraction, gcap_fraction, box_bins;
               data.naflex (SigLIP, native aspect ratio, packed): enabled, max_patches, seq_len, multiple;
               data.eval: zeroshot, retrieval, zeroshot_name, retrieval_name, split, batch_size;
               data.synthetic (the demo's shapes): root, num_train, samples_per_shard, num_eval, image_size, seed,
               train_labels
  loss         name (clip | siglip), impl, chunk_size, terms (recipes: clip, siglip, unicl, itm, mim, distill)
  optim        lr, min_lr, warmup_steps, schedule, weight_decay, beta1, beta2, eps, grad_clip
  engine       zero_stage (0-3), precision, compile, dist_timeout_s, cpu_threads
  train        batch_size (global, all ranks), steps, accum_steps (GradCache), seed, max_skips_in_a_row
  checkpoint   every_steps, keep_last, async_save (write in the background; checkpoint/stall_s per save)
  eval         every_steps, top_k, recall_k, num_workers, itm_rerank_k
  logging      wandb (offline | online | disabled), project, run_name, log_every, progress, sample_keys"""

OUTPUTS = """\
outputs (all in output_dir):
  config.yaml            the resolved config (${oc.env:VAR} values written as such); a restart must match it (only
                         logging.* may change)
  metrics.jsonl          one JSON line per log step (loss, lr, samples_per_s, skipped samples ...) and eval lines
  eval.json              the final zero-shot / retrieval results
  checkpoints/step_N/    DeepSpeed engine state + meta.json + RNG states; checkpoints/latest names the newest
  wandb/                 offline wandb runs (wandb sync <output_dir>/wandb/offline-run-*)
  STOP                   touch it to stop after the current step with a checkpoint"""

EXIT_CODES = """\
exit codes:
  0    finished, or stopped by --stop-after-steps with a checkpoint
  1    an error (one line naming it: bad data past data.max_bad_fraction, non-finite steps in a row, ...)
  2    a bad config or argument (one line naming the key, or the YAML file:line)
  75   stopped on request (Ctrl-C, SIGTERM, SIGUSR1, the STOP file) with a checkpoint: rerun to resume
  130  a second Ctrl-C: exited at once, without saving"""

EPILOG = f"{SECTIONS}\n\n{OUTPUTS}\n\n{EXIT_CODES}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmpretrain.train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", metavar="CONFIG", help="YAML file, or the name of a bundled config: demo, recipes/clip-tiny ..."
    )
    p.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="dotted overrides: train.steps=100 model.name=tiny"
    )
    p.add_argument(
        "--stop-after-steps", type=int, default=0, metavar="N", help="save and exit 0 after N steps (0 = run on)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torch, DeepSpeed and the model load here, after the arguments parsed (and --help answered)
    from torch.distributed.elastic.multiprocessing.errors import record

    from mmpretrain.loop import run

    # record: under torchrun, an exception on any rank is written where the launcher reports it as the root cause
    code = record(run)(args.config, args.overrides, args.stop_after_steps)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
