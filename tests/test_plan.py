"""`python -m lidr_jax.plan` and what it builds on: TPU topology names, the decoding layout, the HLO
collective count, and tiny-model compiles for real TPU topologies on this CPU (libtpu, no TPU).

Compiles for a TPU need libtpu (the `tpu` extra; `make test` installs it, so CI runs them). Splash under a
mesh is also checked numerically: Pallas interpret mode over a 4-device CPU mesh (shard_map and all)
against xla without a mesh, in a subprocess (tests/tpu_worker.py) that sets the device count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from lidr_jax.parallel.sharding import decode_layout
from lidr_jax.parallel.topology import TopologyError, parse
from lidr_jax.parallel.topology import devices as topology_devices
from lidr_jax.pipeline.plan import collectives, main, refusal

GiB = 2**30
needs_libtpu = pytest.mark.skipif(
    find_spec("libtpu") is None, reason="libtpu (pip install 'lidr_jax[tpu]'; make test installs it) compiles for TPU"
)
WORKER = Path(__file__).resolve().parent / "tpu_worker.py"


def test_slice_names_map_to_topologies():
    cases = {
        "v5e-8": ("v5e:2x4", 8, 1),  # one VM of 8 chips
        "v5litepod-16": ("v5e:4x4", 16, 4),
        "v5e:4x8": ("v5e:4x8", 32, 8),
        "v5p-8": ("v5p:2x2x1", 4, 1),
        "v5p:2x2x1": ("v5p:2x2x1", 4, 1),
        "v4-32": ("v4:2x2x4", 16, 4),
        "v6e-8": ("v6e:2x4", 8, 1),
    }
    for name, (jax_name, chips, hosts) in cases.items():
        t = parse(name)
        assert (t.name, t.chips, t.hosts) == (jax_name, chips, hosts), name
    assert parse("v5p:2x2x1").slice_name == "v5p-8"
    with pytest.raises(TopologyError, match=r"^unknown TPU topology 'v9-8': known are JAX names like v5e:2x4"):
        parse("v9-8")
    with pytest.raises(TopologyError, match=r"^unknown TPU slice 'v5e-12': known are"):
        parse("v5e-12")  # no v5e slice has 12 chips
    with pytest.raises(TopologyError, match=r"^unknown TPU topology 'v5p:2x4'"):
        parse("v5p:2x4")  # v5p is a 3-D torus


def test_unknown_topology_is_one_line_before_any_compile(capsys):
    assert main(["--topology", "v9-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown TPU topology 'v9-8': known are") and "\n" not in err


def test_plan_needs_a_config_json(tmp_path, capsys):
    assert main(["--topology", "v5p-8", "--set", f"model={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: model {str(tmp_path)!r}: the directory has no config.json (plan reads only that file)"
    )


def test_decode_layout_replicates_what_fits_and_splits_heads_otherwise():
    eight_b = 16 * GiB  # Llama-3-8B in bfloat16
    v5p = decode_layout(eight_b, 95 * GiB, 4, (32, 8))
    assert v5p.shape == (4, 1, 1)
    assert v5p.why == "weights replicated on every device (they fit in a quarter of one), slots split"
    v5e = decode_layout(eight_b, 16 * GiB, 4, (32, 8))
    assert v5e.shape == (1, 1, 4)  # 4 GiB of weights per chip: the fewest ways within a quarter of a chip
    assert v5e.why == "heads and MLP split 4 ways (tensor), slots over the rest"
    assert decode_layout(eight_b, 16 * GiB, 8, (32, 8)).shape == (2, 1, 4)
    assert decode_layout(20 * GiB, 16 * GiB, 8, (32, 8)).shape == (1, 1, 8)
    seventy_b = decode_layout(131 * GiB, 95 * GiB, 4, (64, 8))  # Llama-3-70B on a v5p host: no quarter
    assert seventy_b.shape == (1, 1, 4)
    assert (
        seventy_b.why == "heads and MLP split 4 ways (tensor), the most this host allows: weights take 34% of a device"
    )
    with pytest.raises(ValueError) as refused:
        decode_layout(131 * GiB, 16 * GiB, 4, (64, 8))
    assert str(refused.value) == (
        "generation runs on each host alone, and the weights (131.0 GiB) take more than half of each of its 4 "
        "devices of 16.0 GiB even split 4 ways by heads (64, 8): use hosts with more memory per device, or a "
        "smaller model"
    )


def test_collectives_are_counted_with_their_bytes():
    hlo = """
  %all-gather-start.1 = (bf16[4,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %p), dimensions={0}
  %all-gather-done.1 = bf16[16,128]{1,0} all-gather-done(%all-gather-start.1)
  %all-reduce.2 = f32[256]{0} all-reduce(f32[256]{0} %x), to_apply=%add
  %reduce-scatter = bf16[2,8]{1,0} reduce-scatter(bf16[8,8]{1,0} %y), dimensions={0}
"""
    got = collectives(hlo)
    assert got["all-gather"] == {"count": 1, "bytes": (4 * 128 + 16 * 128) * 2}
    assert got["all-reduce"] == {"count": 1, "bytes": 1024}
    assert got["reduce-scatter"] == {"count": 1, "bytes": 32}
    assert got["all-to-all"] == {"count": 0, "bytes": 0}


def test_refusal_names_the_program_and_the_compilers_numbers():
    row = {
        "program": "train",
        "fits": False,
        "memory": {"peak": 20 * GiB, "temporaries": 18 * GiB, "arguments": 2 * GiB},
    }
    report = {"topologies": [{"topology": "v5e:4x8", "hbm_per_chip": 16 * GiB, "programs": [row]}]}
    assert refusal(report) == (
        "train does not fit v5e:4x8: the compiler needs 20.00 GiB per chip (18.00 GiB temporaries, 2.00 GiB "
        "arguments), a chip has 16.00 GiB: use more chips, a smaller dpo.row_tokens or batch_size, or "
        "dpo.compute.remat: full"
    )


# ---------------------------------------------------------------------------------- compiles for TPU


def _arch_dir(d: Path, context: int) -> Path:
    """A tiny Llama's config.json in `d` (no weights: the plan reads nothing else)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _arch_dir(tmp_path_factory.mktemp("tiny_arch"), 256)


def _settings(model: Path, attention: str, row_tokens: int = 512) -> list[str]:
    sets = [
        f"model={model}",
        "dtype=bfloat16",
        "generation.max_new_tokens=32",
        "generation.batch_size=8",
        "lidr.translation.max_new_tokens=64",
        "check.enabled=false",
        "dpo.batch_size=4",
        "dpo.grad_accum=2",
        "dpo.max_prompt_len=64",
        "dpo.max_response_len=96",
        f"dpo.row_tokens={row_tokens}",
        "dpo.share_prompt=false",
        f"dpo.compute.attention={attention}",
        "dpo.compute.compute_dtype=bfloat16",
    ]
    return [a for s in sets for a in ("--set", s)]


@needs_libtpu
def test_plan_compiles_every_program_single_and_multi_host(tiny_dir, tmp_path):
    """splash on a single-host v5e and on a 4-host v5e:4x4; the JSON schema."""
    out = tmp_path / "plan.json"
    only = "train,reference,prefill:generate,decode:generate"
    args = ["--topology", "v5e:2x2", "--no-cost", "--only", only, *_settings(tiny_dir, "splash")]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (topo,) = report["topologies"]
    assert (topo["topology"], topo["slice"], topo["chips"], topo["hosts"]) == ("v5e:2x2", "v5e-4", 4, 1)
    assert topo["decode_layout"]["data"] == 4 and topo["decode_layout"]["tensor"] == 1
    assert [row["program"] for row in topo["programs"]] == only.split(",")
    for row in topo["programs"]:
        assert row["fits"] is True and "cost" not in row
        assert set(row["memory"]) == {"arguments", "outputs", "temporaries", "aliased", "code", "peak"}
        assert all(isinstance(v, int) for v in row["memory"].values())
        assert set(row["collectives"]) == {
            "all-gather",
            "reduce-scatter",
            "all-reduce",
            "all-to-all",
            "collective-permute",
        }
        assert row["compile_seconds"] > 0
    # weights replicated for decoding: no all-gather of a weight inside the decode step
    assert topo["programs"][3]["collectives"]["all-gather"]["count"] == 0
    assert topo["programs"][0]["collectives"]["all-gather"]["count"] > 0  # training gathers its fsdp weights

    multi = tmp_path / "multi.json"
    only = "train,decode:generate"
    args = ["--topology", "v5e:4x4", "--no-cost", "--only", only, *_settings(tiny_dir, "splash"), "--json", str(multi)]
    assert main(args) == 0
    (topo,) = json.loads(multi.read_text())["topologies"]
    assert (topo["chips"], topo["hosts"]) == (16, 4)
    assert topo["decode_layout"]["data"] == 4  # one host's 4 chips decode, each with the whole weights
    assert [row["program"] for row in topo["programs"]] == only.split(",")
    assert all(row["fits"] for row in topo["programs"])


@needs_libtpu
def test_every_program_of_a_run(tiny_dir):
    """The programs of a LIDR and an ICR run (built, not compiled): one prefill and decode per stage."""
    from lidr_jax.model.attention import compiling_for
    from lidr_jax.pipeline import plan_programs
    from lidr_jax.pipeline.config import load_run_config

    topo = parse("v5e:2x2")
    devices = topology_devices(topo)
    for reward, want in (
        ("lidr", ["prefill:generate", "decode:generate", "prefill:translate", "decode:translate"]),
        ("icr", ["prefill:sample", "decode:sample", "icr_score"]),
    ):
        sets = [s for s in _settings(tiny_dir, "splash") if s != "--set"] + [f"reward={reward}"]
        sets += [f"icr.reference_model={tiny_dir}"] if reward == "icr" else []
        run = load_run_config(None, sets)
        config = plan_programs.model_architecture(run.model, run.dtype)
        with compiling_for("tpu"):
            programs, _, _ = plan_programs.run_programs(run, config, devices, topo.chip.hbm_bytes)
        assert [p.name for p in programs] == ["train", "reference", *want]


@needs_libtpu
def test_the_cost_estimate_of_the_train_and_decode_steps(tiny_dir, tmp_path):
    out = tmp_path / "plan.json"
    args = ["--topology", "v5e:2x2", "--only", "train,decode:generate", *_settings(tiny_dir, "splash")]
    assert main([*args, "--json", str(out)]) == 0
    (topo,) = json.loads(out.read_text())["topologies"]
    train, decode = topo["programs"]
    for row in (train, decode):
        assert row["cost"]["flops"] > 0 and row["cost"]["bytes accessed"] > 0 and row["cost"]["optimal_seconds"] > 0
        assert row["cost"]["source"] == "compiler, layers unrolled at 1 and 2, extrapolated"
    assert 0 < train["estimated_mfu"] <= 1
    assert train["analytic_peak"] > 0 and "analytic_peak" not in decode  # the analytic plan beside the compiler's
    assert decode["decode"]["bytes_per_chip"] > 0 and 0 < decode["decode"]["estimated_roofline_fraction"] <= 1


@needs_libtpu
def test_xla_attention_compiles_for_v5p(tiny_dir, tmp_path):
    out = tmp_path / "plan.json"
    args = ["--topology", "v5p:2x2x1", "--no-cost", "--only", "train,reference", *_settings(tiny_dir, "xla")]
    assert main([*args, "--json", str(out)]) == 0
    (topo,) = json.loads(out.read_text())["topologies"]
    assert [row["fits"] for row in topo["programs"]] == [True] * 2


@needs_libtpu
def test_splash_temporaries_grow_linearly_with_the_row(tmp_path):
    """A fused kernel materialises no [T, T] scores: at twice the row the train step's temporaries about
    double (they would quadruple with the scores)."""
    from lidr_jax.model.attention import compiling_for
    from lidr_jax.pipeline import plan, plan_programs
    from lidr_jax.pipeline.config import load_run_config

    topo = parse("v5e:2x2")
    long_dir = _arch_dir(tmp_path, 8192)
    temps = {}
    for row_tokens in (1024, 2048):
        sets = [s for s in _settings(long_dir, "splash", row_tokens) if s != "--set"]
        sets += ["dpo.max_prompt_len=512", "dpo.max_response_len=1024", "dpo.batch_size=4", "dpo.grad_accum=1"]
        run = load_run_config(None, sets)
        config = plan_programs.model_architecture(run.model, run.dtype)
        with compiling_for("tpu"):
            programs, _, _ = plan_programs.run_programs(run, config, plan.devices(topo), topo.chip.hbm_bytes)
        temps[row_tokens] = plan.analyse(programs[0], config, topo, with_cost=False)["memory"]["temporaries"]
    assert 1.2 < temps[2048] / temps[1024] < 2.6, temps  # [T, T] scores alone would be 64 MB at 2,048 tokens


@needs_libtpu
def test_a_program_that_does_not_fit_is_refused_with_the_compilers_numbers(tiny_dir, capsys):
    sets = _settings(tiny_dir, "splash") + ["--set", "generation.batch_size=65536"]
    sets += ["--set", "generation.prefill_tokens=1000000000"]  # every slot's prompt prefilled at once
    assert main(["--topology", "v5e:2x2", "--no-cost", "--only", "prefill:generate", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # the compiler refuses it itself: its own line, with its numbers
    assert err.startswith("error: prefill:generate does not fit v5e:2x2: RESOURCE_EXHAUSTED: Ran out of memory")
    assert "exceeds available HBM (15.75G)" in err
    assert err.endswith("Use a smaller generation.prefill_tokens (prompt tokens one refill prefills) or fewer slots")


def test_splash_under_a_cpu_mesh_equals_xla():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(WORKER), "splash_on_mesh"], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["rows"] >= 2
    assert result["max_abs_diff"] < 1e-4  # summed log-probs of ~10-token answers, float32


def test_fit_check_at_load_uses_the_compiled_step_on_cpu(tmp_path):
    """On a CPU the compiled DPO step's memory is checked against the RAM when the analytic plan needs more
    than a quarter of it; a small run compiles nothing."""
    from lidr_jax.parallel.sharding import MeshConfig, make_mesh
    from lidr_jax.pipeline.config import load_run_config
    from lidr_jax.pipeline.plan import check_fits_at_load
    from lidr_jax.train.memory import DoesNotFitError
    from tests.dpo_helpers import write_tiny_hf_dir

    model = write_tiny_hf_dir(tmp_path / "model")
    run = load_run_config(
        None, [f"model={model}", "dpo.batch_size=2", "dpo.max_prompt_len=32", "dpo.max_response_len=32"]
    )
    mesh = make_mesh(MeshConfig(preset="single"))
    assert check_fits_at_load(run, mesh, ram=2**50) is None  # nothing compiled: the plan is far below a quarter
    with pytest.raises(DoesNotFitError) as e:
        check_fits_at_load(run, mesh, ram=2**20)
    message = str(e.value)
    assert message.startswith("DPO training needs ") and "GiB per device on 1 cpu device(s)" in message
    assert "(the compiled step: " in message and message.endswith(
        "but each has 0.00 GiB: use more chips, a smaller dpo.batch_size, packed rows (dpo.row_tokens, and on a "
        "TPU dpo.share_prompt: false for splash attention) or dpo.compute.remat: full"
    )


def test_a_gpu_node_is_planned_analytically(tiny_dir, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["--topology", "h100-8", *_settings(tiny_dir, "auto"), "--json", str(out)]) == 0
    (node,) = json.loads(out.read_text())["topologies"]
    assert (node["topology"], node["chips"], node["hbm_per_chip"]) == ("8 x H100", 8, 80 * 10**9)
    (row,) = node["programs"]
    assert (row["program"], row["source"], row["attention"], row["fits"]) == ("train", "analytic", "cudnn", True)
    assert "8 x H100 (analytic): train needs " in capsys.readouterr().out
    from scripts.plan_table import table

    peak = f"{row['memory']['peak'] / 2**30:.2f}"
    assert table([json.loads(out.read_text())]).splitlines()[2] == (
        "| default | 8 x H100 | train | analytic (no GPU compiler on this machine) | yes |  "
        f"| {peak} |  |  |  | analytic |"
    )


@needs_libtpu
def test_a_hosts_generation_with_split_heads_compiles_on_a_multi_host_slice(tmp_path):
    """One host of a v5e:4x4 holds devices 0, 1, 4, 5; libtpu refuses collectives among all four
    ("Unexpected device_id 4 in replica group"), so a host's generation is compiled on a one-host
    topology shaped like it, here with the heads split over its four chips (collectives in the prefill)."""
    from lidr_jax.model.attention import compiling_for
    from lidr_jax.parallel.sharding import tree_nbytes
    from lidr_jax.parallel.topology import host_devices
    from lidr_jax.pipeline import plan, plan_programs
    from lidr_jax.pipeline.config import load_run_config

    topo = parse("v5e:4x4")
    devices = topology_devices(topo)
    host = host_devices(topo, devices)
    assert sorted(d.id for d in host) == [0, 1, 2, 3] and {d.process_index for d in host} == {0}
    assert host_devices(parse("v5e:2x2"), host) is host  # one host: its own devices
    model = _arch_dir(tmp_path, 256)
    config_json = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config_json, "num_key_value_heads": 4}))  # 4 ways possible
    run = load_run_config(None, [s for s in _settings(model, "xla") if s != "--set"])
    config = plan_programs.model_architecture(run.model, run.dtype)
    weights = tree_nbytes(plan_programs.abstract_params(config))
    with compiling_for("tpu"):  # chips as large as the weights: a quarter fits once the heads split 4 ways
        programs, layout, _ = plan_programs.run_programs(run, config, devices, weights, host)
    assert (layout.data, layout.tensor) == (1, 4)
    prefill = next(p for p in programs if p.name == "prefill:generate")
    compiled, _ = plan._compile(prefill, config)
    assert sum(row["count"] for row in plan.collectives(compiled.as_text()).values()) > 0


@needs_libtpu
def test_decode_hlo_prints_the_step_with_and_without_its_cache_write(tiny_dir, capsys):
    from scripts.decode_hlo import main as decode_hlo

    sets = [s for s in _settings(tiny_dir, "splash") if s != "--set"]
    assert decode_hlo(["--topology", "v5e:2x2", "--top", "3", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "decoding layout data=" in out and "1 layer(s): compiler bytes accessed" in out
    assert "2 layer(s): compiler bytes accessed" in out and "per layer: compiler" in out
    # 8 slots on 4 chips: 2 per chip; key and value, 2 kv heads of 32 dims in bfloat16 per slot and layer
    assert "the cache write as the cost model charges it (0.5 KB per layer)" in out
    assert "the step, 2 layers: compiler's estimate" in out and "without the write" in out


@needs_libtpu
def test_a_hosts_generation_is_compiled_once_for_slices_of_the_same_hosts(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--topology", "v5e-16", "--topology", "v5e-32", "--no-cost", "--only", "decode:generate"]
    assert main([*args, *_settings(tiny_dir, "splash"), "--json", str(out)]) == 0
    small, large = json.loads(out.read_text())["topologies"]
    ((first,), (again,)) = small["programs"], large["programs"]
    assert "same_as" not in first and again["same_as"] == "v5e:4x4" and again["memory"] == first["memory"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].strip().startswith("decode:generate") and printed[-2].endswith(
        "; the program compiled for v5e:4x4"
    )


@needs_libtpu
def test_a_model_no_host_can_decode_is_reported_and_the_rest_still_planned(tmp_path, capsys):
    """Llama-3-70B's shapes on v5e-16: no host of 4 chips of 16 GiB can hold its 131 GiB of bfloat16
    weights to generate; the plan says so as a row (no compile) and exits 2 with one line."""
    big = _arch_dir(tmp_path, 8192)
    config = json.loads((big / "config.json").read_text())
    config.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
    config.update(num_key_value_heads=8, head_dim=128, vocab_size=128256)
    (big / "config.json").write_text(json.dumps(config))
    out = tmp_path / "plan.json"
    args = ["--topology", "v5e-16", "--no-cost", "--only", "decode", *_settings(big, "splash"), "--json", str(out)]
    assert main(args) == 2
    (row,) = json.loads(out.read_text())["topologies"][0]["programs"]
    reason = (
        "generation runs on each host alone, and the weights (131.4 GiB) take more than half of each of its 4 "
        "devices of 16.0 GiB even split 4 ways by heads (64, 8): use hosts with more memory per device, or a "
        "smaller model"
    )
    assert row == {"program": "generation", "note": "every generation stage", "fits": False, "reason": reason}
    printed = capsys.readouterr()
    assert f"  generation         CANNOT RUN: {reason}" in printed.out
    assert printed.err.strip().splitlines() == [f"error: generation cannot run on v5e:4x4: {reason}"]


@needs_libtpu
def test_an_8_chip_v5e_or_v6e_slice_is_one_host():
    """v5litepod-8 and v6e-8 are one VM of 8 chips (JAX's default layout would make two hosts of 4)."""
    for name, hosts in (("v5e-8", {0}), ("v6e-8", {0}), ("v5e-16", {0, 1, 2, 3}), ("v5p-8", {0})):
        devs = topology_devices(parse(name))
        assert {d.process_index for d in devs} == hosts, name


@needs_libtpu
def test_the_attention_fallback_is_said_once_as_the_plans_own_line(tiny_dir, capsys):
    from lidr_jax.model import attention

    attention._said.clear()
    sets = [a if a != "dpo.share_prompt=false" else "dpo.share_prompt=true" for a in _settings(tiny_dir, "auto")]
    assert main(["--topology", "v5e:2x2", "--no-cost", "--only", "train,reference", *sets]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "note: attention auto: using xla, not splash: splash segment ids cannot express a prompt shared by two "
        "answers (set dpo.share_prompt: false)"
    ]
