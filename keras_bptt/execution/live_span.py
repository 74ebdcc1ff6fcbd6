"""Running only the live span of a padded batch.

Documented in `docs/executor.md` ("Padded batches: the live span").

Text and audio come padded to a common length, before their real steps
(`keras.utils.pad_sequences`' default, `padding="pre"`) or after them
(`padding="post"`), and a mask marks the padding. Under
`keras.backend.rnn`'s masking a step masked for every sequence of the batch
changes nothing: each state keeps its previous value, and the step's output
is the previous output (or zeros with `zero_output_for_mask`). So a batch
whose first `start` and last `t - stop` steps are masked for every sequence
is computed exactly by

1. running the recurrence over steps `start .. stop - 1` only (the *live
   span*), from the initial states, with the mask of those steps;
2. giving the `start` leading steps zero outputs (the carried output
   starts as zeros, so they are zeros with or without
   `zero_output_for_mask`), and the `t - stop` trailing steps the live
   span's last output (its carried output), or zeros with
   `zero_output_for_mask`.

The states after the live span are the final states. Gradients follow
through the slices and the padding: the padded steps' inputs get zero
gradients, as in `keras.layers.RNN`, and the trailing outputs' gradients
reach the live span's last output, of which they are copies.

Everything here works in processing order: with `go_backwards` the inputs
and the mask are reversed first, and the recurrence then runs forwards
(outputs stay in processing order, as `keras.layers.RNN` returns them).

Limitations:

* The live span's length is known only when the graph runs, so its plan
  is looked up then (`keras_bptt.execution.interpreter`'s run-time
  programs, cached per length); XLA, which needs static shapes, runs the
  whole padded length (`applies`).
* A run-time program is slower per step than the program of a length
  known while tracing. A batch of static length whose live span is the
  whole length (one sequence as long as the padding) took 2.40x
  `keras.layers.RNN`'s step through the live span, against 1.63x with the
  static program (LSTMCell(128), batch 8, t=1000, `auto` at 5%,
  `benchmarks/padded_batches.py`). So `skip_padding="auto"` runs the live
  span only where the length is unknown while tracing (a model built for
  any length: the executor runs a run-time program anyway), and
  `skip_padding=True` asks for it with a static length too.
* Only padding shared by the whole batch is skipped; a sequence shorter
  than the batch's longest live step is still masked step by step, as in
  `keras.layers.RNN`. Bucketing batches by length (`tf.data`'s
  `bucket_by_sequence_length`) makes the shared padding the whole padding.
"""

import typing

import tensorflow as tf

from keras_bptt.execution import interpreter


class Recurrence(typing.NamedTuple):
    """What a layer's recurrence gives: its outputs, its final states, the
    executor's forward counts and the program's `expected_counts` and
    `plan_facts` (for the counters)."""

    outputs: tf.Tensor
    final_states: list
    forward_counts: typing.Any
    expected_counts: tf.Tensor
    plan_facts: typing.Any


class LiveSpan(typing.NamedTuple):
    """Steps `start .. stop - 1` (processing order) of a `length`-step batch
    are live for some sequence; the others are padding for all of them."""

    start: tf.Tensor
    stop: tf.Tensor
    length: tf.Tensor


def applies(skip_padding, static_length):
    """Whether a masked batch runs its live span (`MemoryBudgetRNN`'s
    `skip_padding`): never under XLA, which needs static shapes; with
    `"auto"`, only when the length is unknown while tracing (module
    docstring, "Limitations")."""
    if skip_padding is False or interpreter._in_xla():
        return False
    return skip_padding is True or static_length is None


def in_processing_order(sequences, mask, go_backwards):
    """`(sequences, mask)` reversed along time when `go_backwards`."""
    if not go_backwards:
        return sequences, mask
    return tf.reverse(sequences, [1]), tf.reverse(mask, [1])


def find(mask):
    """The `LiveSpan` of a boolean `[batch, t, ...]` mask, processing order.

    A batch with no live step at all keeps its whole length: every step is
    then masked, which gives what `keras.layers.RNN` gives.
    """
    axes = [0] + list(range(2, mask.shape.rank))
    live = tf.reduce_any(mask, axis=axes)  # [t]
    length = tf.shape(live, out_type=tf.int32)[0]
    start = tf.cast(tf.argmax(tf.cast(live, tf.int32)), tf.int32)
    stop = length - tf.cast(
        tf.argmax(tf.cast(tf.reverse(live, [0]), tf.int32)), tf.int32)
    return LiveSpan(start, stop, length)


def trim(tensor, span):
    """`tensor[:, span.start:span.stop]`."""
    return tensor[:, span.start : span.stop]


def run(recurrence, sequences, mask, go_backwards):
    """`recurrence` over the live span of a padded batch.

    Args:
        recurrence: `recurrence(sequences, mask, go_backwards, span)`
            returns a `Recurrence` whose outputs are padded back to the
            whole length (`pad_outputs`).
        sequences, mask: `[batch, t, ...]` inputs and boolean mask.
        go_backwards: As `keras.layers.RNN`.

    Returns:
        Its `Recurrence`, outputs with the static shape of the whole
        length's.
    """
    sequences, mask = in_processing_order(sequences, mask, go_backwards)
    span = find(mask)
    result = recurrence(trim(sequences, span), trim(mask, span), False, span)
    shape = result.outputs.shape.as_list()
    if len(shape) > 2:
        shape[1] = sequences.shape[1]
    result.outputs.set_shape(shape)
    return result


def pad_outputs(outputs, span, return_sequences, zero_output_for_mask):
    """The whole batch's outputs from the live span's (module docstring, 2).

    Args:
        outputs: The live span's outputs, `[batch, stop - start, ...]` with
            `return_sequences`, else its last output `[batch, ...]`.
        span: The `LiveSpan`.
        return_sequences, zero_output_for_mask: As `keras.layers.RNN`.

    Returns:
        `[batch, length, ...]` outputs, or the last output `[batch, ...]`.
    """
    padded_tail = span.stop < span.length
    if not return_sequences:
        if not zero_output_for_mask:
            return outputs
        return tf.where(padded_tail, tf.zeros_like(outputs), outputs)
    last = outputs[:, -1:]
    tail = tf.zeros_like(last) if zero_output_for_mask else last
    multiples = tf.concat(
        [[1, span.length - span.stop], tf.ones([outputs.shape.rank - 2], tf.int32)],
        0,
    )
    head_shape = tf.concat(
        [tf.shape(outputs)[:1], [span.start], tf.shape(outputs)[2:]], 0)
    return tf.concat(
        [tf.zeros(head_shape, outputs.dtype), outputs, tf.tile(tail, multiples)],
        axis=1,
    )
