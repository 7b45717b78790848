"""LDRE's adaptive ensemble (diffusers_cir.retrieval.ensemble) against its published steps, written out slot by slot."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_cir.retrieval import ldre_ensemble


def _ldre_slot_by_slot(rewrites, captions, gallery, top_k, temperature):
    """The steps as LDRE's divergent_caption_ensemble.py takes them: one slot at a time, over the whole query set."""
    gallery = F.normalize(gallery, dim=-1)
    per_caption = rewrites.shape[1] // captions.shape[1]
    scores, features = [], []
    for slot in range(rewrites.shape[1]):
        after = F.normalize(rewrites[:, slot], dim=-1) @ gallery.T
        before = F.normalize(captions[:, slot // per_caption], dim=-1) @ gallery.T
        difference = after - before
        difference[difference > 0] = 0
        scores.append(torch.topk(-difference, k=top_k, dim=-1).values.sum().item())
        features.append(F.normalize(rewrites[:, slot], dim=-1))
    scores = torch.tensor(scores)
    weights = torch.softmax(scores / scores.max() / temperature, dim=0)
    return sum(weight * feature for weight, feature in zip(weights, features)), weights


@pytest.mark.parametrize("captions_per_query, top_k, temperature", [(6, 5, 0.04), (3, 2, 0.5)])
def test_the_ensemble_follows_ldres_steps(captions_per_query, top_k, temperature):
    generator = torch.Generator().manual_seed(captions_per_query)
    rewrites = torch.randn(7, 6, 16, generator=generator) * 3
    captions = torch.randn(7, captions_per_query, 16, generator=generator)
    gallery = torch.randn(40, 16, generator=generator)
    queries, weights = ldre_ensemble(rewrites, captions, gallery, top_k=top_k, temperature=temperature)
    expected_queries, expected_weights = _ldre_slot_by_slot(rewrites, captions, gallery, top_k, temperature)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(queries, expected_queries, atol=1e-5, rtol=1e-5)
    assert weights.std() > 0  # the slots are told apart


def test_the_slot_whose_rewrites_move_the_ranking_takes_the_weight():
    generator = torch.Generator().manual_seed(0)
    captions = torch.randn(5, 2, 8, generator=generator)
    rewrites = captions.clone()  # slot 0: the rewrite says what the caption says, no score drops
    rewrites[:, 1] = torch.randn(5, 8, generator=generator)
    queries, weights = ldre_ensemble(rewrites, captions, torch.randn(30, 8, generator=generator))
    assert weights[1] > 0.99  # softmax([0, 1] / 0.04)
    torch.testing.assert_close(queries, F.normalize(rewrites[:, 1], dim=-1), atol=1e-6, rtol=0)


def test_when_no_rewrite_lowers_a_score_the_slots_weigh_the_same():
    captions = torch.randn(4, 3, 8)
    queries, weights = ldre_ensemble(captions * 2, captions, torch.randn(10, 8))
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(queries, F.normalize(captions, dim=-1).mean(dim=1))


def test_bad_inputs_are_refused_by_name():
    rewrites, captions, gallery = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="`caption_embeds`"):
        ldre_ensemble(rewrites, torch.randn(2, 3, 8), gallery)
    with pytest.raises(ValueError, match="`gallery_embeds` has width 6"):
        ldre_ensemble(rewrites, captions, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"`rewrite_embeds` must be a non-empty float array of shape \(queries"):
        ldre_ensemble(rewrites[0], captions, gallery)
    with pytest.raises(ValueError, match="`top_k`"):
        ldre_ensemble(rewrites, captions, gallery, top_k=0)
    with pytest.raises(ValueError, match="`temperature`"):
        ldre_ensemble(rewrites, captions, gallery, temperature=0)
    bad = captions.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="caption_embeds"):
        ldre_ensemble(rewrites, bad, gallery)


def test_blocks_of_queries_give_the_weights_of_the_whole_set(monkeypatch):
    """The drops are computed a block of queries at a time (CIRCO's test set x gallery would not fit at once)."""
    from diffusers_cir.retrieval import ensemble

    generator = torch.Generator().manual_seed(3)
    rewrites, captions = torch.randn(9, 4, 8, generator=generator), torch.randn(9, 2, 8, generator=generator)
    gallery = torch.randn(25, 8, generator=generator)
    whole_queries, whole_weights = ldre_ensemble(rewrites, captions, gallery, top_k=3)
    monkeypatch.setattr(ensemble, "_BLOCK_ELEMENTS", 2 * 4 * 25)  # two queries per block, the last one alone
    queries, weights = ldre_ensemble(rewrites, captions, gallery, top_k=3)
    torch.testing.assert_close(weights, whole_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(queries, whole_queries, atol=1e-6, rtol=1e-5)
    expected_queries, expected_weights = _ldre_slot_by_slot(rewrites, captions, gallery, 3, 0.04)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_compose_ldre_queries_refuses_a_pipeline_without_rewrites():
    from diffusers_cir.retrieval import compose_ldre_queries

    class OneEmbedding:
        @staticmethod
        def call_parameters():
            return frozenset({"image", "prompt", "output_caption_embeds"})

        def __call__(self, image, prompt, output_caption_embeds=False):
            return type("Output", (), {"image_embeds": torch.randn(len(prompt), 8)})()

    with pytest.raises(ValueError, match="OneEmbedding gives no `rewrite_embeds` and `caption_embeds`"):
        compose_ldre_queries(OneEmbedding(), ["is red"], torch.randn(5, 8), reference_images=["ref.png"])
    with pytest.raises(ValueError, match="query 1 has several texts"):
        compose_ldre_queries(OneEmbedding(), ["is red", ["a", "b"]], torch.randn(5, 8), reference_images=["r", "s"])
