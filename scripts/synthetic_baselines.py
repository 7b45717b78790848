#!/usr/bin/env python
"""Recall@1/5/10 of the non-learned baselines on the synthetic CIR world (and reference points).

For each world (``--config default|tiny``, or ``--clip_like``; ``--seeds``) and split (``test``: held-out
compositions; ``validation``: seen compositions, unseen (reference, edit) pairs), retrieving from the whole
gallery with the reference excluded (as CIRR does), Recall@K from ``diffusers_cir.metrics``:

- ``image_only``: the reference image embedding;
- ``text_only``: the modification text embedding (the world's text encoder);
- ``image_text_sum``: the sum of the two unit vectors;
- ``additive_attributes`` (reference point, not a baseline): a least-squares model of the image embeddings on
  one-hot attributes fit on the *seen* items only, queried with the target's attributes. It shows the target
  of an unseen composition is predictable from its attributes: what a composing model must learn;
- ``target_caption`` (ceiling): the target's own caption embedding (an oracle that knows the answer's text);
- ``learned_mlp`` (with ``--train_mlp SECONDS``): a 2-hidden-layer MLP on (reference image, edit text
  embedding), trained on ``train`` triplets only.

    python scripts/synthetic_baselines.py                    # default world, seeds 0-2
    python scripts/synthetic_baselines.py --config tiny --train_mlp 20
    python scripts/synthetic_baselines.py --clip_like --output_json clip_like_baselines.json

Prints a table and writes JSON (``benchmarks/results/synthetic_baselines.json`` by default). The JSON records
the world: ``config``, ``clip_like`` and, per seed, the full ``world_config``
(``diffusers_cir.data.synthetic.config_from_dict`` rebuilds it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig, config_to_dict

KS = (1, 5, 10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("default", "tiny"), default="default")
    parser.add_argument("--clip_like", action="store_true",
                        help="Use SyntheticWorldConfig.clip_like(seed) worlds: the CLIP-like text tower (position "
                             "embeddings std 0.1, content-word attention salience 5, six caption templates) on a "
                             "432-item vocabulary with no 'photo' style, instead of the default random tower. It is "
                             "its own world size, so it only goes with --config default.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--splits", nargs="+", default=["test", "validation"])
    parser.add_argument("--train_mlp", type=float, default=0.0, help="Seconds of MLP training per world (0: skip).")
    parser.add_argument("--output_json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                                               "benchmarks", "results", "synthetic_baselines.json"))
    args = parser.parse_args(argv)
    if args.clip_like and args.config != "default":
        parser.error(f"--clip_like builds SyntheticWorldConfig.clip_like (432 items); "
                     f"it cannot be combined with --config {args.config}.")
    return args


def world_config(args, seed: int) -> SyntheticWorldConfig:
    if args.clip_like:
        return SyntheticWorldConfig.clip_like(seed=seed)
    return SyntheticWorldConfig.tiny(seed=seed) if args.config == "tiny" else SyntheticWorldConfig(seed=seed)


def additive_attribute_predictions(world: SyntheticCIRWorld) -> torch.Tensor:
    """Image embedding of every item predicted from its attributes by a linear model fit on seen items only."""
    codes = world._codes
    sizes = [len(values) for values in world.config.attribute_values.values()]
    features = np.concatenate([np.eye(s)[codes[:, a]] for a, s in enumerate(sizes)] + [np.ones((len(codes), 1))], 1)
    seen = np.array([not item.heldout for item in world.items])
    weights, *_ = np.linalg.lstsq(features[seen], world.image_embeds.numpy()[seen], rcond=None)
    return torch.from_numpy((features @ weights).astype(np.float32))


def train_mlp(world: SyntheticCIRWorld, seconds: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    train = world.triplets("train", num_triplets=50_000, seed=seed)
    text = torch.nn.functional.normalize(world.encode_text(train.modification_texts).text_embeds, dim=-1)
    inputs = torch.cat([world.image_embeds[train.reference_indices], text], dim=1)
    targets = world.image_embeds[train.target_indices]
    width = world.config.projection_dim
    model = torch.nn.Sequential(torch.nn.Linear(2 * width, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                torch.nn.GELU(), torch.nn.Linear(512, width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        batch = torch.randint(len(inputs), (256,))
        loss = (1 - torch.nn.functional.cosine_similarity(model(inputs[batch]), targets[batch])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def evaluate_world(world: SyntheticCIRWorld, splits, mlp_seconds: float) -> dict:
    additive = additive_attribute_predictions(world)
    mlp = train_mlp(world, mlp_seconds) if mlp_seconds > 0 else None
    results = {}
    for split in splits:
        triplets = world.triplets(split)
        queries = dict(world.baseline_queries(triplets))
        queries["additive_attributes"] = additive[triplets.target_indices]
        queries["target_caption"] = world.caption_embeds[triplets.target_indices]
        if mlp is not None:
            text = torch.nn.functional.normalize(world.encode_text(triplets.modification_texts).text_embeds, dim=-1)
            with torch.no_grad():
                queries["learned_mlp"] = mlp(torch.cat([world.image_embeds[triplets.reference_indices], text], dim=1))
        results[split] = {"num_queries": len(triplets)}
        for name, query in queries.items():
            results[split][name] = {k: round(v, 4) for k, v in world.recall_at_k(query, triplets, ks=KS).items()}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster than contended ones
    try:
        return _run(args)
    finally:  # called from Python (a notebook, a test), the process keeps its own thread count
        torch.set_num_threads(threads)


def _run(args) -> int:
    report = {"config": args.config, "clip_like": args.clip_like, "ks": list(KS), "worlds": {}}
    rows = []
    for seed in args.seeds:
        config = world_config(args, seed)
        world = SyntheticCIRWorld(config)
        results = evaluate_world(world, args.splits, args.train_mlp)
        report["worlds"][str(seed)] = {"items": world.num_items, "heldout_pairs": len(world.heldout_pairs),
                                       "world_config": config_to_dict(config), **results}
        for split, methods in results.items():
            for method, recalls in methods.items():
                if method != "num_queries":
                    rows.append((seed, split, methods["num_queries"], method, recalls))
    print(f"{'seed':>4}  {'split':<10}  {'queries':>7}  {'query':<20}  " + "  ".join(f"R@{k:<4}" for k in KS))
    for seed, split, count, method, recalls in rows:
        print(f"{seed:>4}  {split:<10}  {count:>7}  {method:<20}  " + "  ".join(f"{recalls[f'recall_at{k}']:.3f}" for k in KS))
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {os.path.abspath(args.output_json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
