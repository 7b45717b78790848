# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Training-loop side of the data: endless resumable iteration over epochs, and mixing two streams in one batch.

CompoDiff's stage 2 mixes triplets with image-caption pairs (the stage-1 data, which covers concepts the triplets
never reach). With a separate caption dataset each optimiser step takes a fixed share of its rows from that stream;
both streams checkpoint their own position.
"""

from __future__ import annotations

from typing import Any

import torch


class EndlessLoader:
    """Batches from a :class:`~diffusers_cir.data.streaming.TripletDataLoader`, epoch after epoch, resumable.

    ``state_dict()`` taken between two ``next_batch()`` calls, loaded into a fresh ``EndlessLoader`` over an identical
    loader, makes it continue with the next batch (exactly, when the loader's shuffle buffer is off).
    """

    def __init__(self, loader, name: str = "train"):
        self.loader = loader
        self.name = name
        self.epoch = getattr(loader, "epoch", 0)
        self._iterator = None
        self._batches_this_epoch = 0

    def next_batch(self) -> dict:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self._batches_this_epoch == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise ValueError(
                            f"The {self.name} data yields no batch (epoch {self.epoch}): is the split empty, or sharded "
                            "over more processes than it has shards?"
                        ) from None
                self.epoch += 1
                self._iterator = None
                self._batches_this_epoch = 0
                continue
            self._batches_this_epoch += 1
            return batch

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "epoch": self.epoch, "batches": self._batches_this_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.epoch = state["epoch"]
        self._batches_this_epoch = state["batches"]
        self._iterator = None  # the next iterator starts where the saved one stood

    def summary(self) -> str:
        return self.loader.summary()


_ROW_TENSORS = (
    "input_ids",
    "input_ids_2",
    "is_text_to_image",
    "reference_image_embeds",
    "target_image_embeds",
    "reference_pixel_values",
    "target_pixel_values",
    "mask",
    "masked_target_image_embeds",
)


def merge_batches(first: dict, second: dict) -> dict:
    """Rows of two collated batches as one (``ids``/``texts`` concatenated, ``num_skipped`` summed).

    A ``mask`` (or ``masked_target_image_embeds``) present in only one of them is zero for the other's rows.
    """
    merged: dict[str, Any] = {
        "ids": list(first["ids"]) + list(second["ids"]),
        "texts": list(first.get("texts", [])) + list(second.get("texts", [])),
        "num_skipped": first.get("num_skipped", 0) + second.get("num_skipped", 0),
        "skipped": list(first.get("skipped", [])) + list(second.get("skipped", [])),
    }
    sizes = (len(first["ids"]), len(second["ids"]))
    for key in _ROW_TENSORS:
        a, b = first.get(key), second.get(key)
        if a is None and b is None:
            continue
        if key in ("mask", "masked_target_image_embeds"):
            reference = a if a is not None else b
            a = a if a is not None else reference.new_zeros((sizes[0],) + tuple(reference.shape[1:]))
            b = b if b is not None else reference.new_zeros((sizes[1],) + tuple(reference.shape[1:]))
        elif a is None or b is None:
            if sizes[0 if a is None else 1] == 0:
                merged[key] = b if a is None else a
                continue
            raise ValueError(f"Cannot mix batches: only one of them has {key!r}.")
        merged[key] = torch.cat([a, b])
    return merged
