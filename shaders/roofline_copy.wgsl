// Roofline probe: copy bandwidth. Each invocation moves UNROLL vec4 words, strided by the
// workgroup size so that neighbouring invocations touch neighbouring 16-byte words.

override WG: u32 = 256;
override UNROLL: u32 = 4;

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn copy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = arrayLength(&src);
    let base = linear_workgroup(wid, num) * WG * UNROLL + lid;
    for (var j = 0u; j < UNROLL; j++) {
        let i = base + j * WG;
        if (i < n) {
            dst[i] = src[i];
        }
    }
}
