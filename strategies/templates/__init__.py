"""Continual-learning strategies on template-mixture networks (Zhmoginov et al., arXiv 2107.10963).

Every strategy takes the run's model built around the ``template-mixture`` backbone (:mod:`.network`) and keeps
its shared body (stem, template bank, output adapter). On a task-labelled stream (e.g. the ``domains``
benchmark):

- ``template-joint``    all tasks at once, task-balanced batches (multi-task upper bound);
- ``template-finetune`` each experience trains the body and the task's program ξ_t and head (lower bound;
                        with ``backbone.sharing=unshared`` this is the same-size unshared network);
- ``template-program``  the first experience trains everything; afterwards only ξ_t and the head train, so
                        the body and every earlier task are untouched (zero forgetting by construction);
- ``template-ewc``      fine-tuning plus (λ/2) Σ_s F_s (θ − θ*_s)² on the shared parameters (the template
                        bank, or the whole body), F_s the diagonal true Fisher at the end of experience s;
- ``template-ita`` / ``template-iel``: ITA / IEL (:mod:`clcompose.strategies.task_vectors.ita`,
                        :mod:`clcompose.strategies.task_vectors.iel`) with task vectors on the mixture logits:
                        the first experience trains the network, which then is θ0 (statistics frozen), and τ_t
                        lives on ξ only; inference is task-agnostic, with the composed program ξ0 + (1/T) Σ τ_t
                        and all heads concatenated.

A new task's program starts near-uniform (``program_init=uniform``: ξ ~ U[0, 1), the reference init; for
ITA/IEL τ = 0, the base program), as a copy of the most similar earlier task's (``copy``: the program whose
features give the best nearest-class-mean accuracy on the new training data), or as the mean of the earlier
programs (``mean``).

After the stream, each strategy reports (``final_metrics``) the mixture entropy of the programs at their
start and at the end, the template overlap between tasks, the parameters a task adds, and — when the
benchmark holds out a domain — the transfer ladder on it: head only, ξ + head, and full fine-tuning.

Modules: :mod:`.options` (the options), :mod:`.programs` (shared pieces), :mod:`.bookkeeping` (what every
strategy records), :mod:`.ladder` (the transfer ladder), :mod:`.ewc` (EWC maths and plugin),
:mod:`.task_aware` (joint, fine-tuning, program transfer, EWC) and :mod:`.vectors` (ITA / IEL).
"""
