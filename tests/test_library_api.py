"""Issue 14 item 3: the library verbs, from one module, on plain torch LMs; the README's example runs here."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.plain_lms import PlainLSTM, PlainTransformer

README = Path(__file__).resolve().parents[1] / "README.md"
STRATEGY_LINE = re.compile(r"^strategy = .*$", re.MULTILINE)
# The README's strategy line, replaced per strategy; hessian with a cap a test can afford.
STRATEGIES = {"kl": None, "hessian": "strategy = HessianConfig(hessian_batches=1, hessian_max_iters=40)",
              "gumbel": "strategy = GumbelConfig()"}
MODELS = {"lstm": PlainLSTM, "transformer": PlainTransformer}


def readme_example() -> str:
    """The first python block of the README's "Use it as a library" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Use it as a library", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture()
def streams(lm_tokens: torch.Tensor, lm_test_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lm_tokens, lm_test_tokens


@pytest.fixture()
def pretrained(lm_copy: Callable[[str], torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The session's pretrained plain LMs (copies: the tests change them)."""
    return {kind: lm_copy(f"plain_{kind}") for kind in MODELS}


def test_readme_example_is_short_and_uses_one_import() -> None:
    code = [line for line in readme_example().splitlines() if line.strip()]
    assert len(code) < 10
    imports = [line for line in code if line.startswith(("import ", "from "))]
    assert imports == [imports[0]] and imports[0].startswith("from nas.api import ")
    assert len(STRATEGY_LINE.findall(readme_example())) == 1


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("kind", list(MODELS))
def test_readme_example_runs_on_plain_torch_lms(kind: str, strategy: str, pretrained: dict, streams: tuple,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nas.api import GumbelConfig, HessianConfig, evaluate, make_space

    code = readme_example()
    if STRATEGIES[strategy] is not None:
        code = STRATEGY_LINE.sub(STRATEGIES[strategy], code)
    model = copy.deepcopy(pretrained[kind])
    skeleton = MODELS[kind](seed=7)
    train_tokens, test_tokens = streams
    namespace = {"model": model, "skeleton": skeleton, "train_tokens": train_tokens, "test_tokens": test_tokens,
                 "HessianConfig": HessianConfig, "GumbelConfig": GumbelConfig}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example

    precision, loaded = namespace["precision"], namespace["loaded"]
    assert precision.meta["strategy"] == strategy
    space = make_space(pretrained[kind], {"bits": [2, 4, 8]}, 4.0)
    assert space.contains(precision) and space.fits_budget(precision)
    assert loaded is skeleton and (tmp_path / "model.mpq").is_file()
    for (name, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name  # the packed round trip is bit-identical
    assert evaluate(model, test_tokens, precision=precision) == evaluate(loaded, test_tokens, precision=precision)


def test_retrain_takes_batches_and_method_names(pretrained: dict, streams: tuple) -> None:
    from nas.api import PrecisionMap, retrain

    model = copy.deepcopy(pretrained["lstm"])
    rows = streams[0][:641].view(1, -1)
    batches = [(rows[:, i : i + 32], rows[:, i + 1 : i + 33]) for i in range(0, 600, 32)]
    retrain(model, PrecisionMap.uniform(model, 4), batches, "admm")
    with pytest.raises(ValueError, match="unknown retraining method"):
        retrain(model, PrecisionMap.uniform(model, 4), batches, "sgd")
    with pytest.raises(ValueError, match="inputs and targets"):
        retrain(model, PrecisionMap.uniform(model, 4), [(rows, rows[:, :-1])], "ste")


def test_search_takes_names_budget_kinds_and_spaces(pretrained: dict, streams: tuple) -> None:
    from nas.api import make_space, search
    from nas.core.errors import UsageError

    model = pretrained["transformer"]
    uniform = search(model, None, "uniform", streams[0], budget={"compression": 8.0})
    # 8x of FP32 with biases and norms in FP32: 2.6 bits a weight, so uniform 2 bits
    assert set(uniform.bits.values()) == {2} and uniform.meta["budget"] == {"compression": 8.0}
    space = make_space(model, {"bits": [2, 8], "keep_fp": ["*.out_proj"]}, 4.0)
    random_map = search(model, space, "random", streams[0])
    assert random_map.bits["encoder.layers.0.self_attn.out_proj"] == 32 and space.fits_budget(random_map)
    with pytest.raises(UsageError, match="budget"):
        search(model, None, "uniform", streams[0])
    with pytest.raises(ValueError, match="unknown strategy"):
        search(model, None, "greedy", streams[0], budget=2.0)


def test_every_verb_and_config_imports_from_one_module() -> None:
    import nas.api as api

    for name in ("search", "retrain", "quantize_", "export", "load_packed", "evaluate", "KLConfig",
                 "HessianConfig", "GumbelConfig", "UniformConfig", "RandomConfig", "SteConfig", "AdmmConfig"):
        assert name in api.__all__ and callable(getattr(api, name)), name


def test_strategy_names_are_listed_once() -> None:
    from nas.config.options import STRATEGY_CONFIGS
    from nas.config.sections import STRATEGY_NAMES, PipelineSection
    from nas.search.strategies import STRATEGIES

    assert set(STRATEGIES) == set(STRATEGY_NAMES) == set(STRATEGY_CONFIGS)
    assert all(STRATEGIES[name]().name == name for name in STRATEGIES)
    PipelineSection(strategies=list(STRATEGY_NAMES))  # the schema accepts every one


def test_retraining_methods_are_listed_once() -> None:
    from nas.config.options import RETRAIN_CONFIGS
    from nas.config.sections import RETRAIN_METHODS, PipelineSection, RetrainSection

    assert set(RETRAIN_CONFIGS) == set(RETRAIN_METHODS)
    for method in RETRAIN_METHODS:  # the sections accept every one
        RetrainSection(method=method)
        PipelineSection(retrain_method=method)


def test_config_defaults_are_the_sections_defaults() -> None:
    from nas.config.options import RETRAIN_CONFIGS, STRATEGY_CONFIGS
    from nas.config.sections import DataSection, RetrainSection, SearchSection
    from nas.search.gumbel import GumbelSettings

    search, retrain, data = SearchSection(), RetrainSection(), DataSection()
    for cls in STRATEGY_CONFIGS.values():
        for f in dataclasses.fields(cls):
            assert getattr(cls(), f.name) == getattr(search, f.name), (cls.__name__, f.name)
        assert cls().section().strategy == cls.name
    for cls in RETRAIN_CONFIGS.values():
        for f in dataclasses.fields(cls):
            expected = getattr(retrain, f.name) if hasattr(retrain, f.name) else getattr(data, f.name)
            assert getattr(cls(), f.name) == expected, (cls.__name__, f.name)
        assert cls().section().method == cls.method
    for f in dataclasses.fields(GumbelSettings):  # the supernet's defaults are the search section's
        if hasattr(search, f.name):
            assert getattr(GumbelSettings(), f.name) == getattr(search, f.name), f.name


def test_configs_are_checked_by_the_schema() -> None:
    from nas.config.options import AdmmConfig, GumbelConfig, KLConfig, SteConfig
    from nas.config.schema import ConfigError

    with pytest.raises(ConfigError, match="kl_tokens"):
        KLConfig(kl_tokens=0)
    with pytest.raises(ConfigError, match="tau_end"):
        GumbelConfig(tau_start=1.0, tau_end=2.0)
    with pytest.raises(ConfigError, match="rho_max"):
        AdmmConfig(rho=2.0, rho_max=1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        SteConfig(batch_size=0)
