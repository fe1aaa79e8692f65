"""Connito: train, inspect, adapt, compose and retire the experts of Mixture-of-Experts language models.

The package's layers (DESIGN.md, "Shape"; a lower layer never imports a higher one; ``tests/test_layering.py``
checks every import, inside functions too, against this table). Layer 5 holds the methods and the pipelines that
run them, in three steps: ``analysis`` below the other methods, ``orchestration`` above them.

===  ===========================================  =====================================================
 0   ``connito`` (this root: its version)         imports nothing of Connito
 0   ``kernels`` (installed as connito.kernels)   Triton kernels + torch fallback; imports nothing of Connito
 0   ``common``                                   plain-Python helpers (atomic writes, versioned records); the same
 1   ``models``, ``experts``, ``data``            families and loading, the one view of experts, the corpus;
                                                 they may import each other
 2   ``routing``                                  router observation by hooks, router variants
 3   ``parallel``                                 expert parallelism on DeepSpeed AutoEP
 4   ``training``                                 the trainer, its callback and loss-term protocol, checkpoints
 5a  ``analysis``                                 read-only statistics: the method below the other methods
 5b  ``adaptation``, ``composition``,             the methods; they never import each other (what they share
     ``retirement``                               goes down a layer) and may read ``analysis``
 5c  ``orchestration``                            runs the methods as pipelines of jobs; never imports ``cli``
 6   ``cli``, ``__main__``                        the faces (Hydra apps): import anything
===  ===========================================  =====================================================
"""

__version__ = "0.1.0"
