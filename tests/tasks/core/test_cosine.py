import numpy as np

from tasks.core.onnx_graph import cosine, row_cosines


def test_row_cosines_score_a_zeroed_row_as_lost_not_nan():
    """A quantized classifier whose logits collapse to zero must score 0 (a failed gate), never NaN (a broken table)."""
    reference = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]], np.float32)
    candidate = np.array([[0.0, 0.0], [0.0, 0.0], [6.0, 8.0]], np.float32)
    assert row_cosines(candidate, reference).tolist() == [0.0, 1.0, 1.0]
    assert cosine(candidate[:1], reference[:1]) == 0.0
