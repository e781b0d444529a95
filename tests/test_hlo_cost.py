"""dlm_jax.hlo_cost on small hand-written HLO modules in XLA:TPU's printed form (no compiler needed): loop trip counts
(XLA's known_trip_count, a counter stepping by 2 from a constant start), matmul FLOPs of dots and of convolutions whose
padded window has one real tap, HBM vs on-chip (S(1)) bytes, a fused parameter read only through a dynamic slice, an
in-place dynamic-update-slice, async copies counted once, an async slice counted as its slice, and an instruction spread over several lines."""

from __future__ import annotations

import pytest

from dlm_jax import hlo_cost

MODULE = """HloModule jit_step, entry_computation_layout={()->()}

%fused_dot (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[32,16]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0:T(8,128)(2,1)} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_slice (q0: f32[12,256], q1: s32[]) -> f32[1,256] {
  %q0 = f32[12,256]{1,0} parameter(0)
  %q1 = s32[]{:T(128)} parameter(1)
  %c0 = s32[]{:T(128)} constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%q0, %q1, %c0), dynamic_slice_sizes={1,256}
}

%fused_update (u0: f32[12,256], u1: f32[1,256], u2: s32[]) -> f32[12,256] {
  %u0 = f32[12,256]{1,0} parameter(0)
  %u1 = f32[1,256]{1,0} parameter(1)
  %u2 = s32[]{:T(128)} parameter(2)
  %z = s32[]{:T(128)} constant(0)
  ROOT %dus = f32[12,256]{1,0} dynamic-update-slice(%u0, %u1, %u2, %z)
}

%cond (c: (s32[], bf16[64,32])) -> pred[] {
  %c = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) parameter(0)
  %gc = s32[]{:T(128)} get-tuple-element(%c), index=0
  %n = s32[]{:T(128)} constant(8)
  ROOT %lt = pred[]{:T(512)} compare(%gc, %n), direction=LT
}

%body (b: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %b = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%b), index=0
  %ci = s32[]{:T(128)} copy(%i)
  %two = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%ci, %two)
  %x = bf16[64,32]{1,0:T(8,128)(2,1)} get-tuple-element(%b), index=1
  %w = bf16[32,16]{1,0:T(8,128)(2,1)S(1)} constant({...})
  %f = bf16[64,16]{1,0:T(8,128)(2,1)S(1)} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) tuple(%next, %x)
}

%body2 (d: (s32[], bf16[64,32])) -> (s32[], bf16[64,32]) {
  %d = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) parameter(0)
  %dx = bf16[64,32]{1,0:T(8,128)(2,1)} get-tuple-element(%d), index=1
  %dw = bf16[32,16]{1,0:T(8,128)(2,1)} constant({...})
  %dd = bf16[64,16]{1,0:T(8,128)(2,1)} dot(%dx, %dw), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %dt = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) tuple(%d, %dx)
}

ENTRY %main (a: bf16[64,32], s: f32[12,256], k: s32[]) -> bf16[64,16] {
  %a = bf16[64,32]{1,0:T(8,128)(2,1)} parameter(0)
  %s = f32[12,256]{1,0} parameter(1)
  %k = s32[]{:T(128)} parameter(2)
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) tuple(%zero, %a)
  %loop = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) while(%init), condition=%cond, body=%body
  %loop2 = (s32[]{:T(128)}, bf16[64,32]{1,0:T(8,128)(2,1)}) while(%init), condition=%cond, body=%body2, backend_config={"known_trip_count":{"n":"3"}}
  %sl = f32[1,256]{1,0} fusion(%s, %k), kind=kLoop, calls=%fused_slice
  %up = f32[12,256]{1,0} fusion(%s, %sl, %k), kind=kLoop, calls=%fused_update
  %cs = (f32[12,256]{1,0:S(1)}, f32[12,256]{1,0}, u32[]{:S(2)}) copy-start(%up)
  %cd = f32[12,256]{1,0:S(1)} copy-done(%cs)
  %ss = ((f32[12,256]{1,0}), f32[3,256]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%s), slice={[0:3], [0:256]}
  %sd = f32[3,256]{1,0:S(1)} slice-done(%ss)
  %lhs = bf16[16,1,48]{2,1,0} parameter(3)
  %rhs = bf16[12,64,48]{2,1,0} parameter(4)
  %conv = bf16[16,12,64]{2,1,0} convolution(%lhs, %rhs), window={size=12 pad=11_11}, dim_labels=b0f_0oi->b0f
  %buf = bf16[64,16]{1,0} custom-call(), custom_call_target="AllocateBuffer"
  %cc = bf16[64,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/splash_mha_fwd_residuals/pallas_call"}, backend_config={"custom_call_config":
"a kernel's config
spans lines"}
  ROOT %r = bf16[64,16]{1,0} fusion(%a, %dw2), kind=kOutput, calls=%fused_dot
  %dw2 = bf16[32,16]{1,0:T(8,128)(2,1)} parameter(5)
}
"""


def test_hlo_cost_of_a_hand_written_module():
  c = hlo_cost.program_cost(MODULE)
  dot = 2 * 64 * 16 * 32
  # the first loop: counter 0, 2, 4, 6 -> 4 trips; the second: XLA's known_trip_count 3; the root fusion: once;
  # the convolution: 16 x 12 x 64 outputs, 48 input features, one real tap of the 12-wide padded window
  conv = 2 * 16 * 12 * 64 * 48
  assert c.flops == pytest.approx(4 * dot + 3 * dot + dot + conv)
  assert c.loops == 2 and c.unknown_trip_counts == 0 and c.custom_calls == 1  # (an allocation moves no data)
  assert c.kernel_forward_calls == 1 and c.kernel_backward_calls == 0
  x, w, y = 64 * 32 * 2, 32 * 16 * 2, 64 * 16 * 2
  hbm = 4 * x  # loop 1: x in HBM read, the weight and the result on chip
  hbm += 4 * (4 + 4 + 3 * 4)  # loop 1's counter: a copy and an add of s32 scalars
  hbm += 3 * (x + w + y)  # loop 2: all in HBM
  hbm += 256 * 4 + 4 + 256 * 4  # the sliced fusion reads one row (and the index), writes one row
  hbm += 256 * 4 + 4 + 256 * 4  # the in-place update: the update read, the index, one row written
  hbm += 0  # copy-start: its operand `up` is in HBM...
  hbm += 12 * 256 * 4  # ...read once (the start counts operands); the done's result is on chip (S(1))
  hbm += 3 * 256 * 4  # the async slice reads 3 rows of `s` (into on-chip memory)
  hbm += 16 * 48 * 2 + 12 * 64 * 48 * 2 + 16 * 12 * 64 * 2  # the convolution
  hbm += x + y  # the custom call
  hbm += x + w + y  # the root fusion
  assert c.hbm_bytes == pytest.approx(hbm)
  assert c.onchip_bytes == pytest.approx(4 * (w + y) + 12 * 256 * 4 + 3 * 256 * 4)


def test_unknown_trip_count_is_counted_once_and_reported():
  text = MODULE.replace("direction=LT", "direction=NE")
  c = hlo_cost.program_cost(text)
  assert c.unknown_trip_counts == 1  # the first loop's condition is not `i < N`; the second has known_trip_count


def test_no_entry_is_an_error():
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_cost.program_cost("HloModule m\n")
