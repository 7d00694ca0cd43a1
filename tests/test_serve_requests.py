"""What the server accepts, without a server: :func:`runtimes.serve.check_request`, field by field.

Triton refuses a wrong dtype, rank or channel count before the model sees a request, so the
end-to-end tests (tests/test_serve.py) cannot tell whether ``check_request`` checks them too.
It is the one definition of what the model accepts (other front ends call it as well), so
each field is tested here just inside and just outside what it allows.
"""
from __future__ import annotations

import numpy as np
import pytest

from runtimes.serve import RequestError, check_request

MAX_SIDE = 64


def ok(n: int = 1, c: int = 3, h: int = 8, w: int = 8, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((n, c, h, w), dtype=dtype)


def test_a_valid_request_comes_back_unchanged() -> None:
    lr = ok(2, 3, MAX_SIDE, MAX_SIDE)
    assert check_request(lr, MAX_SIDE) is lr


@pytest.mark.parametrize(("lr", "message"), [
    ([[[[0.0]]]], "must be an array, got list"),
    (ok(dtype=np.float64), "must be FP32 (float32), got float64"),
    (ok(dtype=np.float16), "must be FP32 (float32), got float16"),
    (np.zeros((3, 8, 8), np.float32), "rank 4), got shape [3, 8, 8]"),
    (np.zeros((1, 1, 3, 8, 8), np.float32), "rank 4), got shape [1, 1, 3, 8, 8]"),
    (ok(c=1), "must have 3 channels (RGB) in dim 1, got 1"),
    (ok(c=4), "must have 3 channels (RGB) in dim 1, got 4"),
    (ok(n=0), "is empty"),
    (ok(h=0), "is empty"),
    (ok(w=0), "is empty"),
    (ok(h=MAX_SIDE + 1), f"larger than this server's limit of {MAX_SIDE} pixels"),
    (ok(w=MAX_SIDE + 1), f"larger than this server's limit of {MAX_SIDE} pixels"),
], ids=["list", "float64", "float16", "rank3", "rank5", "grey", "rgba", "no-images", "no-rows", "no-columns",
        "too-tall", "too-wide"])
def test_each_field_is_checked(lr, message: str) -> None:
    with pytest.raises(RequestError) as info:
        check_request(lr, MAX_SIDE)
    assert message in str(info.value)


def test_the_limits_themselves_are_accepted() -> None:
    """One pixel and the largest side are inside; the refusals above are one step outside."""
    for lr in (ok(1, 3, 1, 1), ok(h=MAX_SIDE, w=1), ok(h=1, w=MAX_SIDE)):
        assert check_request(lr, MAX_SIDE).shape == lr.shape
