/* One step of the cube's local rule, fused: forward and backward over each cell, in one pass per sample.

   The same function as cube.py's Rule + Cube.step (see there and reference.py), for float32 tensors on CPU:
     nb   = depthwise 3x3x3 correlation of the state (zero padding)      (C per cell)
     f    = [state, nb, extra]                                           (2C + E per cell)
     h    = relu(W1 f + b1)                                              (HD per cell)
     out  = clamp(state + m * (W2 h + b2), -bound, bound)                m: the cell's update mask (0 or 1/p)
   Unfused, every one of those is a pass over the whole batch's memory with matrices too small to keep a core
   busy; fused, a cell's work stays in registers and L1, and a cell whose mask is 0 skips its MLP (half of them
   in training). Samples are independent (a neighbourhood never crosses samples), so threads split the batch by
   samples and need no locks; each thread sums its weight gradients in double, and the caller adds those up.

   Compiled once per shape (fused.py passes -DCUBE_C, -DCUBE_E, -DCUBE_HD), so every size is a constant. Vectors
   are GCC's vector extension (8 floats: AVX2 here, SSE or NEON pairs elsewhere); per-cell vectors are padded
   to multiples of 8 with zeros: CP, EP, HP, and features f = [state | nb | extra] at offsets 0, CP, 2CP.

   Layouts (row-major, contiguous): state, out, nb, g_state: (B, N, C) with N = D*H*W cells in (d, h, w) order;
   extra, g_extra: (B, N, E); h: (B, N, HD). Padded weights from fused.py: dw (27, CP), k = 9i + 3j + l for the
   offset (i-1, j-1, l-1); w1t (FP, HP) = W1 transposed; w1 (HP, FP); b1 (HP); w2t (HP, CP) = W2 transposed;
   w2 (CP, HP); b2 (CP). mask: (B, N) or NULL (every cell updates, m = 1).
*/
#include <stdlib.h>
#include <string.h>

#define C CUBE_C
#define E CUBE_E
#define HD CUBE_HD
#define PAD8(x) (((x) + 7) / 8 * 8)
#define CP PAD8(C)
#define EP PAD8(E)
#define HP PAD8(HD)
#define FP (2 * CP + EP)
#define GRADS (27 * CP + HP * FP + HP + C * HP + CP) /* dw, W1, b1, W2 (C rows of HP), b2 */

typedef float vf __attribute__((vector_size(32), aligned(4)));  /* aligned(4): unaligned loads and stores */
typedef int vi __attribute__((vector_size(32)));
#define V(p) (*(vf *)(p))

static inline vf bcast(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vf relu(vf x) { return (vf)((vi)x & (x > bcast(0.f))); }
/* x where mask (as from `h > 0`) is set, else 0 */
static inline vf keep(vf x, vi mask) { return (vf)((vi)x & mask); }

typedef struct {
    int b0, b1, D, H, W;
    float bound;
    const float *state, *extra, *dw, *w1t, *b1v, *w2t, *b2v, *w1, *w2, *mask, *nb, *h, *out, *g_out;
    float *out_w, *nb_w, *h_w;        /* forward outputs (nb_w, h_w NULL: nothing kept for backward) */
    float *g_state, *g_extra;         /* backward outputs (g_extra may be NULL) */
    double *acc;                      /* backward: this thread's gradient sums, GRADS of them */
} Job;

#define NV (CP / 8)   /* vectors per channel row */
#define HV (HP / 8)
#define FV (FP / 8)
#define UNROLL _Pragma("GCC unroll 8")

/* Per thread: one sample's lattice with a zero border and rows of CP floats, so that every neighbour of every
   cell is at a fixed offset (no bounds checks) and every row is whole vectors. */
typedef struct { float *buf; long off[27]; int P, Q, S; } Padded;

static void padded_init(Padded *p, const Job *j) {
    p->P = j->D + 2; p->Q = j->H + 2; p->S = j->W + 2;
    p->buf = calloc((size_t)p->P * p->Q * p->S * CP, sizeof(float));
    for (int i = 0; i < 3; i++) for (int jj = 0; jj < 3; jj++) for (int l = 0; l < 3; l++)
        p->off[9 * i + 3 * jj + l] = (((long)(i - 1) * p->Q + (jj - 1)) * p->S + (l - 1)) * CP;
}

static inline float *padded_at(const Padded *p, int d, int y, int x) {
    return p->buf + (((size_t)(d + 1) * p->Q + (y + 1)) * p->S + (x + 1)) * CP;
}

/* src: one sample (N cells x C) into the interior; the border stays zero. */
static void padded_fill(Padded *p, const Job *j, const float *src) {
    for (int d = 0; d < j->D; d++) for (int y = 0; y < j->H; y++) for (int x = 0; x < j->W; x++) {
        float *dst = padded_at(p, d, y, x);
        memcpy(dst, src, C * sizeof(float));
        src += C;
    }
}

/* acc = sum_k dw[k] * cell[sign * off_k]: the correlation (sign 1) or its transpose (sign -1). Three partial
   sums (one per plane of the neighbourhood), so that the additions do not wait on each other. */
static inline void gather(const Padded *p, const float *cell, const float *dw, int sign, vf *acc) {
    vf p0[NV], p1[NV], p2[NV];
    UNROLL for (int v = 0; v < NV; v++) p0[v] = p1[v] = p2[v] = bcast(0.f);
    for (int k = 0; k < 9; k++) {
        const float *n0 = cell + sign * p->off[k], *n1 = cell + sign * p->off[k + 9];
        const float *n2 = cell + sign * p->off[k + 18];
        UNROLL for (int v = 0; v < NV; v++) {
            p0[v] += V(dw + k * CP + 8 * v) * V(n0 + 8 * v);
            p1[v] += V(dw + (k + 9) * CP + 8 * v) * V(n1 + 8 * v);
            p2[v] += V(dw + (k + 18) * CP + 8 * v) * V(n2 + 8 * v);
        }
    }
    UNROLL for (int v = 0; v < NV; v++) acc[v] = p0[v] + p1[v] + p2[v];
}

static inline float clamp(float t, float bound) { return t > bound ? bound : (t < -bound ? -bound : t); }

/* hid = relu(W1 f + b1) and delta = W2 hid + b2 for two cells a and b at once: every weight vector is loaded once
   for both, and each cell's sums run in two independent chains (they are latency-bound otherwise). */
static inline void mlp2(const Job *j, const float *fa, const float *fb, float *ha, float *hb, float *da, float *db) {
    vf a[HV], b[HV];
    UNROLL for (int v = 0; v < HV; v++) a[v] = b[v] = V(j->b1v + 8 * v);
    for (int i = 0; i < FP; i++) {
        const vf x = bcast(fa[i]), y = bcast(fb[i]);
        UNROLL for (int v = 0; v < HV; v++) {
            const vf w = V(j->w1t + i * HP + 8 * v);
            a[v] += w * x;
            b[v] += w * y;
        }
    }
    UNROLL for (int v = 0; v < HV; v++) { V(ha + 8 * v) = relu(a[v]); V(hb + 8 * v) = relu(b[v]); }
    vf a0[NV], a1[NV], b0[NV], b1[NV];
    UNROLL for (int v = 0; v < NV; v++) { a0[v] = b0[v] = V(j->b2v + 8 * v); a1[v] = b1[v] = bcast(0.f); }
    for (int k = 0; k < HP; k += 2) {  /* the hidden padding is zero */
        const vf x0 = bcast(ha[k]), x1 = bcast(ha[k + 1]), y0 = bcast(hb[k]), y1 = bcast(hb[k + 1]);
        UNROLL for (int v = 0; v < NV; v++) {
            const vf w0 = V(j->w2t + k * CP + 8 * v), w1 = V(j->w2t + (k + 1) * CP + 8 * v);
            a0[v] += w0 * x0;
            a1[v] += w1 * x1;
            b0[v] += w0 * y0;
            b1[v] += w1 * y1;
        }
    }
    UNROLL for (int v = 0; v < NV; v++) { V(da + 8 * v) = a0[v] + a1[v]; V(db + 8 * v) = b0[v] + b1[v]; }
}

/* Per sample, pass 1 over all cells: the features [state | nb | extra] into a per-sample table (and the outputs
   of the cells that do not update); pass 2: the MLP of the updating cells, two at a time. */
static void *forward_job(void *arg) {
    const Job *j = arg;
    const int N = j->D * j->H * j->W;
    Padded sp;
    padded_init(&sp, j);
    float *feat = aligned_alloc(32, (size_t)N * FP * sizeof(float));
    int *active = malloc((size_t)(N + 1) * sizeof(int));
    memset(feat, 0, (size_t)N * FP * sizeof(float));
    float ha[HP] __attribute__((aligned(32))), hb[HP] __attribute__((aligned(32)));
    float da[CP] __attribute__((aligned(32))), db[CP] __attribute__((aligned(32)));
    for (int b = j->b0; b < j->b1; b++) {
        padded_fill(&sp, j, j->state + (size_t)b * N * C);
        const size_t row0 = (size_t)b * N;
        int n_active = 0;
        for (int d = 0, n = 0; d < j->D; d++) for (int y = 0; y < j->H; y++) for (int x = 0; x < j->W; x++, n++) {
            const float *cell = padded_at(&sp, d, y, x);
            float *f = feat + (size_t)n * FP;
            vf acc[NV];
            gather(&sp, cell, j->dw, 1, acc);
            UNROLL for (int v = 0; v < NV; v++) { V(f + 8 * v) = V(cell + 8 * v); V(f + CP + 8 * v) = acc[v]; }
            if (j->nb_w) memcpy(j->nb_w + (row0 + n) * C, f + CP, C * sizeof(float));
            if (j->mask && j->mask[row0 + n] == 0.f) {  /* not updated: the MLP's result would be multiplied by 0 */
                float *o = j->out_w + (row0 + n) * C;
                for (int c = 0; c < C; c++) o[c] = clamp(f[c], j->bound);
                if (j->h_w) memset(j->h_w + (row0 + n) * HD, 0, HD * sizeof(float));
                continue;
            }
            if (E) memcpy(f + 2 * CP, j->extra + (row0 + n) * E, E * sizeof(float));
            active[n_active++] = n;
        }
        if (n_active % 2) active[n_active] = active[n_active - 1];  /* an odd last cell is paired with itself */
        for (int t = 0; t < n_active; t += 2) {
            const int na = active[t], nb = active[t + 1];
            mlp2(j, feat + (size_t)na * FP, feat + (size_t)nb * FP, ha, hb, da, db);
            for (int pick = 0; pick < 2; pick++) {
                const int n = pick ? nb : na;
                const float *f = feat + (size_t)n * FP, *delta = pick ? db : da, *hid = pick ? hb : ha;
                const float m = j->mask ? j->mask[row0 + n] : 1.f;
                float *o = j->out_w + (row0 + n) * C;
                for (int c = 0; c < C; c++) o[c] = clamp(f[c] + m * delta[c], j->bound);
                if (j->h_w) memcpy(j->h_w + (row0 + n) * HD, hid, HD * sizeof(float));
            }
        }
    }
    free(active);
    free(feat);
    free(sp.buf);
    return NULL;
}

/* One cell's MLP backward: gs (CP) holds the gradient after the clamp; adds the state's direct gradient to it,
   writes g_nb (CP, the neighbourhood's gradient) and the extra's, and adds the weight gradients to the sums. */
static void cell_backward(const Job *j, size_t row, const float *cell, float m, float *gs, float *gnb,
                          float *sum) {
    float *g_w1 = sum + 27 * CP, *g_b1 = g_w1 + HP * FP, *g_w2 = g_b1 + HP, *g_b2 = g_w2 + C * HP;
    float f[FP] __attribute__((aligned(32))), hid[HP] __attribute__((aligned(32)));
    float gd[CP] __attribute__((aligned(32))), gh[HP] __attribute__((aligned(32)));
    memset(f, 0, sizeof f);
    memset(hid, 0, sizeof hid);
    UNROLL for (int v = 0; v < NV; v++) V(f + 8 * v) = V(cell + 8 * v);
    memcpy(f + CP, j->nb + row * C, C * sizeof(float));
    if (E) memcpy(f + 2 * CP, j->extra + row * E, E * sizeof(float));
    memcpy(hid, j->h + row * HD, HD * sizeof(float));
    UNROLL for (int v = 0; v < NV; v++) { V(gd + 8 * v) = V(gs + 8 * v) * bcast(m); V(g_b2 + 8 * v) += V(gd + 8 * v); }
    vf ghv[HV], gfv[FV];
    UNROLL for (int v = 0; v < HV; v++) ghv[v] = bcast(0.f);
    for (int c = 0; c < C; c++) {
        const vf g = bcast(gd[c]);
        UNROLL for (int v = 0; v < HV; v++) {
            V(g_w2 + c * HP + 8 * v) += g * V(hid + 8 * v);
            ghv[v] += g * V(j->w2 + c * HP + 8 * v);
        }
    }
    UNROLL for (int v = 0; v < HV; v++) {
        ghv[v] = keep(ghv[v], V(hid + 8 * v) > bcast(0.f));
        V(g_b1 + 8 * v) += ghv[v];
        V(gh + 8 * v) = ghv[v];
    }
    vf p0[FV], p1[FV];  /* two partial sums of gf over k: independent chains */
    UNROLL for (int v = 0; v < FV; v++) p0[v] = p1[v] = bcast(0.f);
    for (int k = 0; k < HP; k += 2) {  /* gh's padding is zero */
        const vf g0 = bcast(gh[k]), g1 = bcast(gh[k + 1]);
        UNROLL for (int v = 0; v < FV; v++) {
            V(g_w1 + k * FP + 8 * v) += g0 * V(f + 8 * v);
            V(g_w1 + (k + 1) * FP + 8 * v) += g1 * V(f + 8 * v);
            p0[v] += g0 * V(j->w1 + k * FP + 8 * v);
            p1[v] += g1 * V(j->w1 + (k + 1) * FP + 8 * v);
        }
    }
    UNROLL for (int v = 0; v < FV; v++) gfv[v] = p0[v] + p1[v];
    UNROLL for (int v = 0; v < NV; v++) { V(gs + 8 * v) += gfv[v]; V(gnb + 8 * v) = gfv[NV + v]; }
    if (j->g_extra && E) {
        float ge[EP] __attribute__((aligned(32)));
        UNROLL for (int v = 0; v < EP / 8; v++) V(ge + 8 * v) = gfv[2 * NV + v];
        memcpy(j->g_extra + row * E, ge, E * sizeof(float));
    }
}

/* Pass 1 over a sample: each cell's clamp and MLP backward (g_nb for every cell, into a padded lattice);
   pass 2: the neighbourhood's backward (the transposed correlation into g_state, and dw's gradient). */
static void *backward_job(void *arg) {
    const Job *j = arg;
    const int N = j->D * j->H * j->W;
    Padded sp, gp;
    padded_init(&sp, j);
    padded_init(&gp, j);
    float *sum = calloc(GRADS, sizeof(float));  /* one sample's sums: a few thousand cells, float is enough */
    float gs[CP] __attribute__((aligned(32)));
    for (int b = j->b0; b < j->b1; b++) {
        padded_fill(&sp, j, j->state + (size_t)b * N * C);
        for (int d = 0, n = 0; d < j->D; d++) for (int y = 0; y < j->H; y++) for (int x = 0; x < j->W; x++, n++) {
            const size_t row = (size_t)b * N + n;
            const float *go = j->g_out + row * C, *o = j->out + row * C;
            const float m = j->mask ? j->mask[row] : 1.f;
            float *gnb = padded_at(&gp, d, y, x);
            for (int c = 0; c < CP; c++) gs[c] = c < C && o[c] < j->bound && o[c] > -j->bound ? go[c] : 0.f;
            if (m == 0.f) {
                memset(gnb, 0, CP * sizeof(float));
                if (j->g_extra && E) memset(j->g_extra + row * E, 0, E * sizeof(float));
            } else {
                cell_backward(j, row, padded_at(&sp, d, y, x), m, gs, gnb, sum);
            }
            memcpy(j->g_state + row * C, gs, C * sizeof(float));
        }
        for (int d = 0, n = 0; d < j->D; d++) for (int y = 0; y < j->H; y++) for (int x = 0; x < j->W; x++, n++) {
            float *gsr = j->g_state + ((size_t)b * N + n) * C;
            const float *g = padded_at(&gp, d, y, x), *cell = padded_at(&sp, d, y, x);
            vf acc[NV];
            gather(&gp, g, j->dw, -1, acc);
            float t[CP] __attribute__((aligned(32)));
            UNROLL for (int v = 0; v < NV; v++) V(t + 8 * v) = acc[v];
            for (int c = 0; c < C; c++) gsr[c] += t[c];
            vf gv[NV];
            UNROLL for (int v = 0; v < NV; v++) gv[v] = V(g + 8 * v);
            for (int k = 0; k < 27; k++) {
                const float *nbr = cell + sp.off[k];
                UNROLL for (int v = 0; v < NV; v++) V(sum + k * CP + 8 * v) += gv[v] * V(nbr + 8 * v);
            }
        }
        for (int i = 0; i < GRADS; i++) { j->acc[i] += sum[i]; sum[i] = 0.f; }
    }
    free(sum);
    free(sp.buf);
    free(gp.buf);
    return NULL;
}

static int run_jobs(Job *base, int B, int threads, void *(*fn)(void *), double *acc) {
    if (threads > B) threads = B;
    if (threads < 1) threads = 1;
    Job jobs[threads];
    for (int t = 0; t < threads; t++) {
        jobs[t] = *base;
        jobs[t].b0 = (int)((long)B * t / threads);
        jobs[t].b1 = (int)((long)B * (t + 1) / threads);
        jobs[t].acc = acc ? acc + (size_t)t * GRADS : NULL;
    }
    /* OpenMP, linked to the libgomp that torch has loaded: the same worker threads as torch's own ops (threads
       of a second pool would compete with torch's, which spin for a while after each op) */
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) fn(&jobs[t]);
    return threads;
}

int cube_step_grads(void) { return GRADS; }

void cube_step_forward(int B, int D, int H, int W, int threads, const float *state, const float *extra,
                       const float *dw, const float *w1t, const float *b1, const float *w2t, const float *b2,
                       const float *mask, float bound, float *out, float *nb, float *h) {
    Job j = {.D = D, .H = H, .W = W, .bound = bound, .state = state, .extra = extra, .dw = dw, .w1t = w1t,
             .b1v = b1, .w2t = w2t, .b2v = b2, .mask = mask, .out_w = out, .nb_w = nb, .h_w = h};
    run_jobs(&j, B, threads, forward_job, NULL);
}

/* grads: GRADS floats (padded layouts: dw, W1, b1, W2's C rows, b2), the sums over the batch. */
void cube_step_backward(int B, int D, int H, int W, int threads, const float *state, const float *extra,
                        const float *dw, const float *w1, const float *w2, const float *mask, float bound,
                        const float *nb, const float *h, const float *out, const float *g_out, float *g_state,
                        float *g_extra, float *grads) {
    double *acc = calloc((size_t)(threads > 1 ? threads : 1) * GRADS, sizeof(double));
    Job j = {.D = D, .H = H, .W = W, .bound = bound, .state = state, .extra = extra, .dw = dw, .w1 = w1,
             .w2 = w2, .mask = mask, .nb = nb, .h = h, .out = out, .g_out = g_out, .g_state = g_state,
             .g_extra = g_extra};
    const int used = run_jobs(&j, B, threads, backward_job, acc);
    for (int i = 0; i < GRADS; i++) {
        double total = 0;
        for (int t = 0; t < used; t++) total += acc[(size_t)t * GRADS + i];
        grads[i] = (float)total;
    }
    free(acc);
}
