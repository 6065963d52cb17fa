"""Every script picks its device the same way: CUDA, then MPS, then CPU; a named device that is not
here is a one-line error. Availability is faked, so this runs on any machine."""
import pytest
import torch

import cifar_twinflow
import imagenet_twinflow
import mnist_twinflow
import scale_qwen_image
import toy_2d

SCRIPTS = [toy_2d, mnist_twinflow, cifar_twinflow, imagenet_twinflow, scale_qwen_image]


def fake_machine(monkeypatch, cuda, mps):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.__name__ for s in SCRIPTS])
def test_auto_prefers_cuda_then_mps_then_cpu_and_a_missing_device_is_a_one_line_error(script, monkeypatch):
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        fake_machine(monkeypatch, cuda, mps)
        assert script.pick_device("auto").type == expected
    for name in ("cuda", "mps", "tpu"):
        with pytest.raises(SystemExit, match=f"--device {name}: not available here") as e:
            script.pick_device(name)
        assert "\n" not in str(e.value)
    fake_machine(monkeypatch, True, True)
    assert script.pick_device("cuda").type == "cuda" and script.pick_device("mps").type == "mps"
    assert script.pick_device("cpu").type == "cpu"
