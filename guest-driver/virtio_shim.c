// SPDX-License-Identifier: GPL-2.0
/*
 * freehint.ko as a virtio driver: the C side, for what the bindings lack.
 * They have no virtio types or functions at all (linux/virtio*.h are not in
 * bindings_helper.h), so what touches the fields of a `struct
 * virtio_device` or `struct virtqueue`, or a static inline of the virtio
 * headers, is a wrapper here; the exported functions (virtqueue_kick, ...)
 * Rust calls directly. Every decision is made in Rust (virtio.rs and
 * virtio/): the feature table and the callbacks come from there at
 * registration, and the per-device objects (work items, workqueue, wait
 * queue, stop lock, OOM notifier, page list) are Rust's `DeviceObjects`,
 * kept as the device's `priv` pointer.
 *
 * What is more than a one-line wrapper, and why it is C:
 * - `struct virtio_driver` and its id table: no bindings for them, and
 *   MODULE_DEVICE_TABLE is a macro that emits the module alias;
 * - freehint_find_vqs() builds the `struct virtqueue_info` array;
 * - freehint_vq_add_bufs() builds the scatterlists;
 * - freehint_vq_wait_buf() wraps the wait_event_timeout() macro.
 * The numbers of `enum freehint_cb` are those of `enum Callback` in
 * virtio.rs.
 */

#include <linux/build_bug.h>
#include <linux/jiffies.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/stddef.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_config.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "virtio_shim.h"

/* Layouts virtio.rs mirrors (checked there against the same figures). */
static_assert(sizeof(struct freehint_virtio_ops) == 5 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, validate) == 0 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, probe) == 1 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, remove) == 2 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, config_changed) == 3 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, vq_callback) == 4 * sizeof(void *));
static_assert(sizeof(struct freehint_buf) == 3 * sizeof(long));
static_assert(offsetof(struct freehint_buf, addr) == 0);
static_assert(offsetof(struct freehint_buf, pfn) == sizeof(long));
static_assert(offsetof(struct freehint_buf, len) == 2 * sizeof(long));

/* Virtqueue callbacks, in the order of `enum Callback` in virtio.rs. */
enum freehint_cb {
	FREEHINT_CB_NONE = 0,
	FREEHINT_CB_ACK = 1,
	FREEHINT_CB_STATS = 2,
};

/* The most buffers one chain has (a header and its payload). */
#define FREEHINT_MAX_BUFS 2

static const struct freehint_virtio_ops *freehint_ops;

/* ---- callbacks of the virtio core, forwarded to Rust ---- */

static void freehint_vq_ack(struct virtqueue *vq)
{
	freehint_ops->vq_callback(vq->vdev->priv, FREEHINT_CB_ACK);
}

static void freehint_vq_stats(struct virtqueue *vq)
{
	freehint_ops->vq_callback(vq->vdev->priv, FREEHINT_CB_STATS);
}

static int freehint_validate(struct virtio_device *vdev)
{
	return freehint_ops->validate(vdev);
}

static int freehint_probe(struct virtio_device *vdev)
{
	return vdev->config->get ? freehint_ops->probe(vdev) : -EINVAL;
}

static void freehint_remove(struct virtio_device *vdev)
{
	freehint_ops->remove(vdev);
}

static void freehint_config_changed(struct virtio_device *vdev)
{
	freehint_ops->config_changed(vdev->priv);
}

static const struct virtio_device_id freehint_id_table[] = {
	{ VIRTIO_ID_BALLOON, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
/*
 * The module alias (virtio:d00000005v*), as Linux's virtio_balloon has: udev
 * loads freehint.ko for a balloon device once it is installed and depmod has
 * run; blacklisting virtio_balloon leaves the device to it.
 */
MODULE_DEVICE_TABLE(virtio, freehint_id_table);

/* The feature table is Rust's (set in freehint_virtio_register). */
static struct virtio_driver freehint_virtio_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = freehint_id_table,
	.validate = freehint_validate,
	.probe = freehint_probe,
	.remove = freehint_remove,
	.config_changed = freehint_config_changed,
};

/* ---- driver registration (module init/exit) ---- */

int freehint_virtio_register(const struct freehint_virtio_ops *ops, const unsigned int *features,
			     unsigned int nr_features)
{
	freehint_ops = ops;
	freehint_virtio_driver.feature_table = features;
	freehint_virtio_driver.feature_table_size = nr_features;
	return register_virtio_driver(&freehint_virtio_driver);
}

void freehint_virtio_unregister(void)
{
	unregister_virtio_driver(&freehint_virtio_driver);
}

/* ---- one-line wrappers: the device ---- */

void freehint_set_priv(struct virtio_device *vdev, void *objs)
{
	WRITE_ONCE(vdev->priv, objs);
}

void *freehint_priv(const struct virtio_device *vdev)
{
	return READ_ONCE(vdev->priv);
}

bool freehint_has_feature(const struct virtio_device *vdev, unsigned int bit)
{
	return bit < 64 && __virtio_test_bit(vdev, bit);
}

void freehint_clear_feature(struct virtio_device *vdev, unsigned int bit)
{
	if (bit < 64)
		__virtio_clear_bit(vdev, bit);
}

/* What virtio_cread_le does for a 32-bit field (the balloon's config is LE). */
u32 freehint_config_read_le32(struct virtio_device *vdev, unsigned int offset)
{
	__le32 v;

	might_sleep();
	vdev->config->get(vdev, offset, &v, sizeof(v));
	return le32_to_cpu(v);
}

/* What virtio_cwrite_le does for a 32-bit field. */
void freehint_config_write_le32(struct virtio_device *vdev, unsigned int offset, u32 v)
{
	__le32 le = cpu_to_le32(v);

	might_sleep();
	vdev->config->set(vdev, offset, &le, sizeof(le));
}

void freehint_device_ready(struct virtio_device *vdev)
{
	virtio_device_ready(vdev);
}

void freehint_del_vqs(struct virtio_device *vdev)
{
	vdev->config->del_vqs(vdev);
}

/* Builds the virtqueue_info array from the names and callback kinds Rust chose. */
int freehint_find_vqs(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[],
		      const char *const names[], const u8 cbs[])
{
	struct virtqueue_info info[5] = {};
	unsigned int i;

	if (nvqs > ARRAY_SIZE(info))
		return -EINVAL;
	for (i = 0; i < nvqs; i++) {
		info[i].name = names[i];
		info[i].callback = cbs[i] == FREEHINT_CB_ACK ? freehint_vq_ack :
				   cbs[i] == FREEHINT_CB_STATS ? freehint_vq_stats : NULL;
	}
	return virtio_find_vqs(vdev, nvqs, vqs, info, NULL);
}

/*
 * Per-CPU, freezable and CPU-intensive, as Linux's virtio_balloon. 7.3 wants
 * WQ_PERCPU spelled out (it warns when a workqueue has neither WQ_PERCPU nor
 * WQ_UNBOUND); 6.12 has no WQ_PERCPU (per-CPU is its default).
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(7, 3, 0)
#define FREEHINT_HINT_WQ_FLAGS (WQ_FREEZABLE | WQ_CPU_INTENSIVE | WQ_PERCPU)
#else
#define FREEHINT_HINT_WQ_FLAGS (WQ_FREEZABLE | WQ_CPU_INTENSIVE)
#endif

/* The workqueue free page hinting runs on (alloc_workqueue is a macro in 7.3). */
struct workqueue_struct *freehint_alloc_hint_wq(void)
{
	return alloc_workqueue("freehint-wq", FREEHINT_HINT_WQ_FLAGS, 0);
}

/* ---- one-line wrappers: virtqueues ---- */

/*
 * One chain: @out device-readable buffers, then @in device-writable ones.
 * A buffer is driver memory (@addr, linear-mapped: kmalloc) or, with @addr
 * NULL, guest memory from @pfn (checked with pfn_valid). The token is the
 * queue itself: nothing is done with it.
 */
int freehint_vq_add_bufs(struct virtqueue *vq, const struct freehint_buf *bufs, unsigned int out,
			 unsigned int in)
{
	struct scatterlist sg[FREEHINT_MAX_BUFS], *sgs[FREEHINT_MAX_BUFS];
	unsigned int i;

	if (out + in == 0 || out + in > FREEHINT_MAX_BUFS)
		return -EINVAL;
	for (i = 0; i < out + in; i++) {
		if (bufs[i].len > UINT_MAX)
			return -EINVAL;
		if (bufs[i].addr) {
			sg_init_one(&sg[i], bufs[i].addr, bufs[i].len);
		} else {
			if (!pfn_valid(bufs[i].pfn))
				return -EINVAL;
			sg_init_table(&sg[i], 1);
			sg_set_page(&sg[i], pfn_to_page(bufs[i].pfn), bufs[i].len, 0);
		}
		sgs[i] = &sg[i];
	}
	return virtqueue_add_sgs(vq, sgs, out, in, vq, GFP_KERNEL);
}

unsigned int freehint_vq_num_free(const struct virtqueue *vq)
{
	return vq->num_free;
}

/*
 * Sleeps on @wq until the device returns a buffer of @vq, at most @ms
 * milliseconds (UINT_MAX: no limit, as tell_host); NULL on timeout.
 */
void *freehint_vq_wait_buf(wait_queue_head_t *wq, struct virtqueue *vq, unsigned int *len,
			   unsigned int ms)
{
	long timeout = ms == UINT_MAX ? MAX_SCHEDULE_TIMEOUT : msecs_to_jiffies(ms);
	void *token = NULL;

	wait_event_timeout(*wq, (token = virtqueue_get_buf(vq, len)), timeout);
	return token;
}
