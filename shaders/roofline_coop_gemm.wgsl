// Roofline probe: f16 GEMM on cooperative matrices (tensor cores), f32 accumulation.
// C[M, N] = A[M, K] · B[K, N], all row-major. One subgroup per workgroup computes a
// 32x32 block of C (2x2 tiles of 16x16) straight from global memory: no workgroup-memory staging, so this
// is the plain cooperative-matrix rate, not a tuned GEMM.
enable f16;
enable wgpu_cooperative_matrix;

override SG: u32 = 32;  // the adapter's subgroup size: one subgroup per workgroup

struct Params {
    m: u32,  // rows of A and C, a multiple of 32
    n: u32,  // columns of B and C, a multiple of 32
    k: u32,  // columns of A, rows of B, a multiple of 16
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f16>;         // [m, k]
@group(0) @binding(1) var<storage, read> b: array<f16>;         // [k, n]
@group(0) @binding(2) var<storage, read_write> c: array<f32>;   // [m, n]
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(SG)
fn coop_gemm(@builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * 32u;
    let col0 = wid.x * 32u;
    // The host dispatches exactly (n/32, m/32) workgroups: cooperative operations need uniform
    // control flow, so there is no early return here.
    var acc00 = coop_mat16x16<f32, C>();
    var acc01 = coop_mat16x16<f32, C>();
    var acc10 = coop_mat16x16<f32, C>();
    var acc11 = coop_mat16x16<f32, C>();
    for (var kk = 0u; kk < params.k; kk += 16u) {
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a[row0 * params.k + kk], params.k);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a[(row0 + 16u) * params.k + kk], params.k);
        let b0 = coopLoadT<coop_mat16x16<f16, B>>(&b[kk * params.n + col0], params.n);
        let b1 = coopLoadT<coop_mat16x16<f16, B>>(&b[kk * params.n + col0 + 16u], params.n);
        acc00 = coopMultiplyAdd(a0, b0, acc00);
        acc01 = coopMultiplyAdd(a0, b1, acc01);
        acc10 = coopMultiplyAdd(a1, b0, acc10);
        acc11 = coopMultiplyAdd(a1, b1, acc11);
    }
    // naga 30 needs every coopStore operand, the element index included, bound with `let`
    // (else its SPIR-V writer panics).
    let stride = params.n;
    let c00 = row0 * stride + col0;
    let c01 = c00 + 16u;
    let c10 = (row0 + 16u) * stride + col0;
    let c11 = c10 + 16u;
    coopStoreT(acc00, &c[c00], stride);
    coopStoreT(acc01, &c[c01], stride);
    coopStoreT(acc10, &c[c10], stride);
    coopStoreT(acc11, &c[c11], stride);
}
