"""A tiny ppdet-shaped detector for fast unit tests of the distiller's mechanics.

Like ppdet architectures it has ``backbone``/``neck``/``head`` sublayers, takes the batch dict, returns a
loss dict in train mode and predictions in eval mode. The neck returns one tensor per level (stride 4, 8,
16, ...); ``head.cls`` is one conv shared by all levels (called once per level).
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class ToyNeck(nn.Layer):
    def __init__(self, in_ch: int, out_ch: int, levels: int):
        super().__init__()
        self.lateral = nn.LayerList([nn.Conv2D(in_ch, out_ch, 1) for _ in range(levels)])

    def forward(self, x):
        outs = []
        for i, conv in enumerate(self.lateral):
            outs.append(conv(F.avg_pool2d(x, 2 ** i) if i else x))
        return outs


class ToyHead(nn.Layer):
    def __init__(self, ch: int):
        super().__init__()
        self.convs = nn.LayerList([nn.Conv2D(ch, ch, 3, padding=1)])
        self.cls = nn.Conv2D(ch, 2, 1)

    def forward(self, feats):
        return [self.cls(F.relu(self.convs[0](f))) for f in feats]


class ToyDet(nn.Layer):
    def __init__(self, width: int = 8, neck_ch: int = 8, levels: int = 2, dropout: float = 0.5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2D(3, width, 3, stride=4, padding=1), nn.BatchNorm2D(width),
                                      nn.ReLU(), nn.Dropout(dropout))
        self.neck = ToyNeck(width, neck_ch, levels)
        self.head = ToyHead(neck_ch)

    def forward(self, inputs):
        outs = self.head(self.neck(self.backbone(inputs['image'])))
        if self.training:
            loss_cls = paddle.add_n([(o ** 2).mean() for o in outs])
            return {'loss': loss_cls, 'loss_cls': loss_cls}
        return {'bbox': paddle.concat([o.mean(axis=[2, 3]) for o in outs], axis=1)}


def toy_inputs(n: int = 2, size: int = 32, seed: int = 0) -> dict:
    paddle.seed(seed)
    return {'image': paddle.rand([n, 3, size, size]),
            'im_shape': paddle.to_tensor([[size, size]] * n, dtype='float32'),
            'scale_factor': paddle.ones([n, 2]),
            'gt_bbox': paddle.to_tensor([[[2., 3., 20., 18.]]] * n, dtype='float32')}
