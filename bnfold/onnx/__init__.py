"""The ONNX side of bnfold: the fold pass and ONNX file I/O.

``graph``      walking graphs, subgraphs and functions; per-scope uses; producers; fresh names; shapes
``constants``  what is constant (initializers, Constant, Identity, constant subgraphs, static metadata)
``sources``    what yields a per-channel affine map (BatchNormalization, ...)
``absorb``     pure checks per absorbing layer -> Plan | Reject
``rewrite``    apply(plan): all graph surgery, under the name rule
``fold``       the loop to a fixed point and the report (``fold_model``, ``count_bn``)
``io``         wire reader, external data, lazy load, streaming atomic save

Nothing heavy is imported here: ``import bnfold.onnx.io`` does not load the pass.
"""
