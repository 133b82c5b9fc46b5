"""The measurements behind the frame protocol's statistics (runtime/src/stream/policy.rs
`FRAME_ALPHA`, `FRAME_MIN_PLANE`): per-frame BatchNorm statistics schemes on MobileNetV2 and the
carphone clip, simulated on the CPU with ONNX Runtime (seconds per scheme where lavapipe needs an
hour). Usage: .venv/bin/python tools/frame_stats_sweep.py [rbn|planes|alpha]

The simulator:

Each BatchNormalization becomes: m_b, v_b = batch stats over (N,H,W) of X (biased);
mean_used = a_l * m_b + bm_l ; var_used = a_l * v_b + bv_l ; y = (X-mean_used)/sqrt(var_used+eps)*g+b.
a_l (scalar), bm_l, bv_l (C) are graph inputs; m_b, v_b are graph outputs.
"""
import sys
from pathlib import Path

import numpy as np, onnx, onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
from onnx import helper, TensorProto, numpy_helper

def load_y4m(path):
    path = str(path)
    with open(path, 'rb') as f:
        data = f.read()
    hdr_end = data.index(b'\n')
    hdr = data[:hdr_end].split()
    w = int([h for h in hdr if h.startswith(b'W')][0][1:]); h = int([x for x in hdr if x.startswith(b'H')][0][1:])
    full = any(x == b'XCOLORRANGE=FULL' for x in hdr)
    pos = hdr_end + 1
    frames = []
    fs = w * h * 3 // 2
    while pos < len(data):
        nl = data.index(b'\n', pos)
        pos = nl + 1
        raw = np.frombuffer(data[pos:pos + fs], np.uint8)
        pos += fs
        Y = raw[:w*h].reshape(h, w).astype(np.float64)
        U = raw[w*h:w*h + w*h//4].reshape(h//2, w//2).astype(np.float64)
        V = raw[w*h + w*h//4:].reshape(h//2, w//2).astype(np.float64)
        U = U.repeat(2, 0).repeat(2, 1); V = V.repeat(2, 0).repeat(2, 1)
        if full:
            Yc, Uc, Vc = Y, U - 128, V - 128
        else:
            Yc = (Y - 16) * 255 / 219; Uc = (U - 128) * 255 / 224; Vc = (V - 128) * 255 / 224
        kr, kb = 0.299, 0.114; kg = 1 - kr - kb
        R = Yc + 2 * (1 - kr) * Vc
        G = Yc - 2 * kb * (1 - kb) / kg * Uc - 2 * kr * (1 - kr) / kg * Vc
        B = Yc + 2 * (1 - kb) * Uc
        frames.append(np.clip(np.stack([R, G, B]), 0, 255))
    return frames

def preprocess(img, resize=256, crop=224):
    c, h, w = img.shape
    if h <= w:
        nh, nw = resize, int(resize * w / h)
    else:
        nw, nh = resize, int(resize * h / w)
    top = round((nh - crop) / 2); left = round((nw - crop) / 2)
    def coords(n_out, off, src, dst):
        i = np.arange(n_out) + off
        p = (i + 0.5) * (src / dst) - 0.5
        p = np.maximum(p, 0)
        i0 = np.floor(p).astype(int); i1 = np.minimum(i0 + 1, src - 1); i0 = np.minimum(i0, src - 1)
        return i0, i1, p - i0
    y0, y1, fy = coords(crop, top, h, nh)
    x0, x1, fx = coords(crop, left, w, nw)
    a = img[:, y0][:, :, x0]; b = img[:, y0][:, :, x1]; cc = img[:, y1][:, :, x0]; d = img[:, y1][:, :, x1]
    fx = fx[None, None, :]; fy = fy[None, :, None]
    out = (a * (1 - fx) + b * fx) * (1 - fy) + (cc * (1 - fx) + d * fx) * fy
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]; std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((out / 255 - mean) / std).astype(np.float32)

class Net:
    def __init__(self, path=str(ROOT / 'assets/mobilenetv2.onnx')):
        m = onnx.load(path)
        g = m.graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        new_nodes = []
        self.layers = []  # per BatchNorm: name, channels C, source mean and variance (float64), eps
        extra_inputs, extra_outputs = [], []
        for n in g.node:
            if n.op_type != 'BatchNormalization':
                new_nodes.append(n); continue
            eps = [a.f for a in n.attribute if a.name == 'epsilon']
            eps = eps[0] if eps else 1e-5
            X, sc, bi, mu, va = n.input
            l = len(self.layers); p = f'bn{l}_'
            C = inits[mu].shape[0]
            self.layers.append(dict(name=n.name, C=C, mean=inits[mu].astype(np.float64), var=inits[va].astype(np.float64), eps=eps))
            sh = numpy_helper.from_array(np.array([1, C, 1, 1], np.int64), p + 'shape'); g.initializer.append(sh)
            epsT = numpy_helper.from_array(np.array(eps, np.float32), p + 'eps'); g.initializer.append(epsT)
            nn = [
                helper.make_node('ReduceMean', [X], [p + 'mb'], axes=[0, 2, 3], keepdims=1),
                helper.make_node('Sub', [X, p + 'mb'], [p + 'd']),
                helper.make_node('Mul', [p + 'd', p + 'd'], [p + 'd2']),
                helper.make_node('ReduceMean', [p + 'd2'], [p + 'vb'], axes=[0, 2, 3], keepdims=1),
                helper.make_node('Reshape', [p + 'bm', p + 'shape'], [p + 'bm4']),
                helper.make_node('Reshape', [p + 'bv', p + 'shape'], [p + 'bv4']),
                helper.make_node('Mul', [p + 'mb', p + 'am'], [p + 'amb']),
                helper.make_node('Add', [p + 'amb', p + 'bm4'], [p + 'mu']),
                helper.make_node('Mul', [p + 'vb', p + 'av'], [p + 'avb']),
                helper.make_node('Add', [p + 'avb', p + 'bv4'], [p + 'vu']),
                helper.make_node('Add', [p + 'vu', p + 'eps'], [p + 've']),
                helper.make_node('Sqrt', [p + 've'], [p + 'sd']),
                helper.make_node('Sub', [X, p + 'mu'], [p + 'xc']),
                helper.make_node('Div', [p + 'xc', p + 'sd'], [p + 'xh']),
                helper.make_node('Reshape', [sc, p + 'shape'], [p + 'g4']),
                helper.make_node('Reshape', [bi, p + 'shape'], [p + 'b4']),
                helper.make_node('Mul', [p + 'xh', p + 'g4'], [p + 'xg']),
                helper.make_node('Add', [p + 'xg', p + 'b4'], [n.output[0]]),
                helper.make_node('Reshape', [p + 'mb', p + 'flat'], [p + 'mb_out']),
                helper.make_node('Reshape', [p + 'vb', p + 'flat'], [p + 'vb_out']),
            ]
            g.initializer.append(numpy_helper.from_array(np.array([C], np.int64), p + 'flat'))
            new_nodes += nn
            extra_inputs += [helper.make_tensor_value_info(p + 'am', TensorProto.FLOAT, []),
                             helper.make_tensor_value_info(p + 'av', TensorProto.FLOAT, []),
                             helper.make_tensor_value_info(p + 'bm', TensorProto.FLOAT, [C]),
                             helper.make_tensor_value_info(p + 'bv', TensorProto.FLOAT, [C])]
            extra_outputs += [helper.make_tensor_value_info(p + 'mb_out', TensorProto.FLOAT, [C]),
                              helper.make_tensor_value_info(p + 'vb_out', TensorProto.FLOAT, [C])]
        del g.node[:]
        g.node.extend(new_nodes)
        g.input.extend(extra_inputs); g.output.extend(extra_outputs)
        so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=['CPUExecutionProvider'])
        self.L = len(self.layers)

    def run(self, x, am, av, bm, bv):
        """x [N,3,224,224]; am/av per layer scalars; bm/bv per layer vectors. Returns logits, [m_b], [v_b]."""
        feed = {'input': x}
        for l in range(self.L):
            p = f'bn{l}_'
            feed[p + 'am'] = np.array(am[l], np.float32); feed[p + 'av'] = np.array(av[l], np.float32)
            feed[p + 'bm'] = bm[l].astype(np.float32); feed[p + 'bv'] = bv[l].astype(np.float32)
        outs = self.sess.run(None, feed)
        logits = outs[0]
        mb = [outs[1 + 2 * l].astype(np.float64) for l in range(self.L)]
        vb = [outs[2 + 2 * l].astype(np.float64) for l in range(self.L)]
        return logits, mb, vb

    def source(self, x):
        z = [0.0] * self.L
        return self.run(x, z, z, [l['mean'] for l in self.layers], [l['var'] for l in self.layers])


def softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def planes_of(path):
    from onnx import shape_inference
    m = onnx.load(path)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m = shape_inference.infer_shapes(m)
    vi = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    return np.array([vi[n.input[0]][2] * vi[n.input[0]][3] for n in m.graph.node if n.op_type == 'BatchNormalization'])


def rbn(net, m=0.05, w=None):
    """RBN as the old frame mode ran it: running <- (1-m) running + m frame, normalising with the
    updated values; `w` (per layer 0/1) restricts it to some layers."""
    L = net.L
    w = np.ones(L) if w is None else w
    def run(frames):
        rm = [l['mean'].copy() for l in net.layers]; rv = [l['var'].copy() for l in net.layers]
        out = []
        for x in frames:
            am = [w[l] * m for l in range(L)]
            bm = [(1 - w[l] * m) * rm[l] for l in range(L)]; bv = [(1 - w[l] * m) * rv[l] for l in range(L)]
            z, mb, vb = net.run(x, am, am, bm, bv)
            rm = [r + w[l] * m * (a - r) for l, (a, r) in enumerate(zip(mb, rm))]
            rv = [r + w[l] * m * (a - r) for l, (a, r) in enumerate(zip(vb, rv))]
            out.append(softmax(z[0]))
        return np.array(out)
    return run


def anchored(net, planes, am, av, window=8, min_plane=0):
    """The bn_frame kernel (shaders/norm.wgsl): source + a r (evidence - source), evidence of the
    previous frames only, r = min(n, W)/W, population variance V + (M2 - M1^2)."""
    L = net.L
    def run(frames):
        sm = [l['mean'] for l in net.layers]; sv = [l['var'] for l in net.layers]
        M1 = [np.zeros_like(a) for a in sm]; M2 = [np.zeros_like(a) for a in sm]; V = [np.zeros_like(a) for a in sv]
        out = []
        for t, x in enumerate(frames):
            r = min(t, window) / window
            bm, bv = [], []
            for l in range(L):
                k = 0.0 if planes[l] < min_plane else 1.0
                var_est = V[l] + np.maximum(M2[l] - M1[l] ** 2, 0)
                bm.append(sm[l] + k * am * r * (M1[l] - sm[l])); bv.append(sv[l] + k * av * r * (var_est - sv[l]))
            z, mb, vb = net.run(x, [0.0] * L, [0.0] * L, bm, bv)
            rate = max(1.0 / window, 1.0 / (t + 1))
            M1 = [e + rate * (a - e) for e, a in zip(M1, mb)]; M2 = [e + rate * (a * a - e) for e, a in zip(M2, mb)]
            V = [e + rate * (a - e) for e, a in zip(V, vb)]
            out.append(softmax(z[0]))
        return np.array(out)
    return run


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else 'alpha'
    net = Net()
    planes = planes_of(str(ROOT / 'assets/mobilenetv2.onnx'))
    clean = [preprocess(f)[None] for f in load_y4m(ROOT / 'assets/video/carphone_pristine.y4m')]
    dist = [preprocess(f)[None] for f in load_y4m(ROOT / 'assets/video/carphone_distorted.y4m')]
    src_clean = np.array([net.source(x)[0].argmax() for x in clean])
    src_dist = np.array([net.source(x)[0].argmax() for x in dist])
    base = 100 * (src_dist == src_clean).mean()

    def evaluate(run, name):
        pc, pd = run(clean), run(dist)
        print(f'{name:40s} clean agrees with unadapted {100 * (pc.argmax(1) == src_clean).mean():6.2f} %  '
              f'compressed agrees with clean {100 * (pd.argmax(1) == src_clean).mean():6.2f} % (unadapted {base:.2f} %)  '
              f'mean top-1 prob clean {pc.max(1).mean():.3f}', flush=True)

    if which == 'rbn':
        evaluate(rbn(net), 'rbn m=0.05 (the old frame mode)')
    elif which == 'planes':
        for p in [12544, 3136, 784, 196, 49]:
            evaluate(rbn(net, w=(planes >= p).astype(float)), f'rbn only on maps >= {p}')
        for p in [196, 49]:
            evaluate(rbn(net, w=(planes <= p).astype(float)), f'rbn only on maps <= {p}')
    elif which == 'alpha':
        evaluate(anchored(net, planes, 0.02, 0.02), 'anchored a=0.02')
        evaluate(anchored(net, planes, 0.05, 0.05), 'anchored a=0.05')
        evaluate(anchored(net, planes, 0.0, 0.05), 'anchored variance only a=0.05')
        for a in [0.005, 0.01, 0.02, 0.05]:
            evaluate(anchored(net, planes, a, a, min_plane=64), f'anchored a={a}, 7x7 kept')
        evaluate(anchored(net, planes, 0.0, 0.0), 'anchored a=0 (FRAME_ALPHA)')


if __name__ == '__main__':
    main()
