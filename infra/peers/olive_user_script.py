"""Helpers for build_peers.py's Olive workflows (peers venv).

- ``example_input_func``: example inputs for ``ov.convert_model`` of the PyTorch BertModel (OpenVINOConversion);
  the converted model keeps dynamic batch and sequence axes (``static: false`` in the pass config).
- ``nncf_transform_fn``: maps one batch of Olive's calibration dataloader (a dict of int64 tensors, no label,
  produced by Olive's ``tokenizer_pre_process``) to the OpenVINO model's inputs (OpenVINOQuantization).
- ``score_onnx``: not used by Olive; build_peers.py ranks the olive_ort_int8 grid with it.
"""

import torch


def example_input_func():
    # "[CLS] hello world [SEP]" for bert-base-uncased vocab; only shapes/dtypes matter for tracing.
    ids = torch.tensor([[101, 7592, 2088, 102]], dtype=torch.int64)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }


def nncf_transform_fn(data_item):
    if isinstance(data_item, (list, tuple)):  # (data, label) layout, label unused
        data_item = data_item[0]
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in data_item.items()}



def score_onnx(path, ref_npz):
    """Cosine of an ONNX model's sentence embeddings (mean pooling over the attention mask, L2 normalised) to the
    fp32 sentence-transformers (torch) embeddings in ref_npz (STSb-dev sentences that are neither calibration nor
    check sentences); each sentence alone at its own length. Used by build_peers.py to rank the Olive int8 grid."""
    import numpy as np
    import onnxruntime as ort

    ref = np.load(ref_npz)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    out = "last_hidden_state" if "last_hidden_state" in out_names else out_names[0]
    offs, ids, emb = ref["offsets"], ref["input_ids"], ref["embeddings"]
    cos = []
    for i in range(len(offs) - 1):
        x = ids[offs[i]:offs[i + 1]][None, :].astype(np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        h = sess.run([out], {n: feed[n] for n in names})[0][0]
        e = h.mean(0)
        e = e / np.linalg.norm(e)
        cos.append(float(e @ emb[i]))
    return {"mean_cos": float(np.mean(cos)), "min_cos": float(np.min(cos))}
