"""FashionBLIP-2 beyond the shared contract (tests/test_pipeline_contract.py): the multi-head score a vector index
serves, queries that read both the reference and the text, and LoRA fine-tuning merged into a folder that reloads."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import picture  # noqa: E402
from tiny_fusion import tiny_fashionblip2_pipeline  # noqa: E402

from diffusers_cir import AutoCIRPipeline, MultiHeadMatchingHead  # noqa: E402


def test_inner_product_of_two_embeddings_is_the_mean_of_the_heads_cosines():
    torch.manual_seed(0)
    head = MultiHeadMatchingHead(hidden_size=16, num_heads=3, head_dim=5)
    query = head(torch.randn(4, 6, 16), side="query").embeds
    candidate = head(torch.randn(4, 6, 16), side="candidate").embeds
    per_head = [torch.nn.functional.cosine_similarity(query.view(4, 3, 5)[:, h, None], candidate.view(4, 3, 5)[None, :, h],
                                                      dim=-1) for h in range(3)]
    torch.testing.assert_close(query @ candidate.T, sum(per_head) / 3, atol=1e-6, rtol=0)
    assert torch.allclose(query.norm(dim=-1), torch.ones(4))


def test_the_two_sides_pool_with_their_own_weights_and_bad_states_are_refused():
    head = MultiHeadMatchingHead(hidden_size=16, num_heads=2, head_dim=4)
    states = torch.randn(2, 5, 16)
    assert not torch.allclose(head(states, side="query").embeds, head(states, side="candidate").embeds)
    with pytest.raises(ValueError, match=r"`states` must be \(batch_size, num_tokens, 16\)"):
        head(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="side"):
        head(states, side="gallery")
    with pytest.raises(ValueError, match="`num_heads` must be a positive integer"):
        MultiHeadMatchingHead(hidden_size=16, num_heads=0)


def test_a_query_reads_both_the_reference_and_the_text():
    pipe = tiny_fashionblip2_pipeline()
    base = pipe(image=picture(0), prompt="make it red").image_embeds
    assert not torch.allclose(base, pipe(image=picture(1), prompt="make it red").image_embeds, atol=1e-4)
    assert not torch.allclose(base, pipe(image=picture(0), prompt="has two dogs").image_embeds, atol=1e-4)
    assert math.isclose(float(base.norm()), 1.0, rel_tol=1e-5)


def test_lora_fine_tuning_learns_and_the_merged_folder_reloads(tmp_path, single_thread):
    from diffusers_cir.training.fashionblip2 import add_qformer_adapters, fashionblip2_loss, merged_model

    pipe = tiny_fashionblip2_pipeline()
    original = copy.deepcopy(pipe.model.state_dict())
    texts = ["make it red", "has two dogs", "with long sleeves", "is blue"]
    tokens = pipe.tokenize_prompt(texts)
    references = pipe.image_processor([picture(i) for i in range(4)], return_tensors="pt").pixel_values
    targets = pipe.image_processor([picture(10 + i) for i in range(4)], return_tensors="pt").pixel_values

    torch.manual_seed(0)
    model, head = add_qformer_adapters(pipe.model, rank=4, alpha=8), pipe.matching_head.train()
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(25):
        loss, _ = fashionblip2_loss(model, head, references, tokens["input_ids"], tokens["attention_mask"], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    trained = type(pipe)(model=merged_model(model).eval(), matching_head=head.eval(), tokenizer=pipe.tokenizer,
                         image_processor=pipe.image_processor)
    trained.set_progress_bar_config(disable=True)
    state = trained.model.state_dict()
    assert not any("lora" in name for name in state)
    changed = {name for name, value in state.items() if not torch.equal(value, original[name])}
    assert changed and all(name.startswith("qformer.") for name in changed)  # adapters on the Q-Former only
    trained.save_pretrained(tmp_path / "fashionblip2")
    loaded = AutoCIRPipeline.from_pretrained(tmp_path / "fashionblip2")
    loaded.set_progress_bar_config(disable=True)
    query = {"image": [picture(0), picture(1)], "prompt": texts[:2]}
    torch.testing.assert_close(loaded(**query).image_embeds, trained(**query).image_embeds, atol=1e-5, rtol=0)
    scores = trained(**query).image_embeds @ trained.encode_image([picture(10), picture(11)]).T
    assert (scores.argmax(dim=1) == torch.arange(2)).all()  # each query finds its own target
