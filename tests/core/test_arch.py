import pytest

import effml
from effml.core.arch import ArchSpec, NormSpec, get_arch, register_arch
from effml.core.surgery import block_linears, iter_linears
from effml.testing import FAMILIES, tiny_model


def test_required_families_registered():
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"):
        assert fam in effml.supported_architectures()


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_matches_model(family):
    model = tiny_model(family)
    arch = get_arch(model)
    h = arch.heads(model.config)
    assert (h.n_heads, h.n_kv_heads, h.head_dim) == (4, 2, 16)
    for block in model.get_submodule(arch.layers):
        for name, norm in arch.norms.items():
            w = block.get_submodule(norm.path).weight
            assert w.shape[0] == (h.head_dim if norm.per_head else h.hidden), name
        refs = block_linears(block, 0, arch, model.config)
        roles = [r for ref in refs for r in ref.roles]
        assert sorted(roles) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
        for ref in refs:  # role slices tile the output rows exactly
            sizes = [ref.role_weight(r).shape[0] for r in ref.roles]
            assert sum(sizes) == ref.module.out_features
    expected = {"q": h.n_heads * h.head_dim, "k": h.n_kv_heads * h.head_dim, "v": h.n_kv_heads * h.head_dim,
                "gate": h.intermediate, "up": h.intermediate}
    for ref in iter_linears(model, blocks=[0]):
        for role, n in expected.items():
            if role in ref.roles:
                assert ref.role_weight(role).shape[0] == n


def test_fused_phi3_role_rows_are_the_model_split():
    import torch

    model = tiny_model("phi3")
    ref = next(iter_linears(model, roles=["k"]))
    assert ref.fused and ref.role == "q+k+v"
    x = torch.randn(3, 64)
    out = ref.module(x)
    # phi3 splits qkv as [q | k | v]; the registry's k rows must produce the model's k
    assert torch.allclose(out[:, 64:96], x @ ref.role_weight("k").T)


def test_unknown_family_error_names_supported_and_how_to_register():
    class Cfg:
        model_type = "nonexistent_family"

    with pytest.raises(ValueError) as e:
        get_arch(Cfg())
    msg = str(e.value)
    assert "nonexistent_family" in msg and "llama" in msg and "phi3" in msg and "register_arch" in msg


def test_register_new_family_and_duplicates():
    spec = ArchSpec("my_llama_clone", linears=get_arch(tiny_model("llama")).linears,
                    norms={"input": NormSpec("input_layernorm", feeds=("q", "k", "v"))})
    register_arch(spec)
    assert "my_llama_clone" in effml.supported_architectures()
    with pytest.raises(ValueError, match="already registered"):
        register_arch(spec)
    with pytest.raises(ValueError, match="unknown linear roles"):
        ArchSpec("bad", linears={"qq": "x"}, norms={})
