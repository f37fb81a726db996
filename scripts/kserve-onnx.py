#!/usr/bin/env python3
"""KServe's Python V2 model server running one ONNX model with ONNX Runtime (CPU, one
intra-op thread): the V2 peer scripts/bench-overflow.sh uses as an overflow target.

    kserve-onnx.py --model-dir .cache/models/minilm --http-port 8085 [--name minilm] [--grpc-port 8086]

With --grpc-port it also serves the V2 protocol over gRPC (scripts/bench-grpc.sh).
"""
import argparse
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

DT = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64", np.dtype("int64"): "INT64",
      np.dtype("int32"): "INT32", np.dtype("bool"): "BOOL", np.dtype("uint8"): "UINT8"}


class OnnxModel(Model):
    def __init__(self, name: str, path: Path):
        super().__init__(name)
        self.path = path
        self.session = None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, feeds)
        infer_outputs = []
        for name, arr in zip(names, outs):
            out = InferOutput(name=name, shape=list(arr.shape), datatype=DT[arr.dtype])
            out.set_data_from_numpy(arr, binary_data=False)
            infer_outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=infer_outputs,
                             response_id=payload.id or str(uuid.uuid4()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--name", default="minilm")
    ap.add_argument("--http-port", type=int, default=8085)
    ap.add_argument("--grpc-port", type=int)
    args = ap.parse_args()
    model = OnnxModel(args.name, args.model_dir / "model.onnx")
    grpc = args.grpc_port is not None
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port if grpc else args.http_port + 1, workers=1,
                enable_grpc=grpc).start([model])


if __name__ == "__main__":
    main()
