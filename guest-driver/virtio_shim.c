// SPDX-License-Identifier: GPL-2.0
/*
 * freehint.ko as a virtio driver: the C side, for what 6.12's `kernel`
 * crate and bindings lack. The bindings have no virtio types or functions at
 * all (linux/virtio*.h are not in bindings_helper.h), so everything that
 * touches a `struct virtio_device` or `struct virtqueue` is a wrapper here.
 * Every decision (features, queues, buffers, when to stop) is made in Rust:
 * the feature table and the callbacks come from virtio.rs at registration.
 *
 * What is more than a one-line wrapper, and why it is still C:
 * - `struct virtio_driver` and its id table: no bindings for them, and
 *   MODULE_DEVICE_TABLE is a macro that emits the module alias;
 * - the callbacks of the virtio core, which forward to the Rust ops table;
 * - per device, `struct freehint_vb`: the work items, the hint workqueue,
 *   the wait queue the virtqueue callbacks wake, the stop flag and the OOM
 *   notifier. 6.12's `kernel::workqueue` enqueues only `Arc`/`Pin<KBox>`
 *   items and has no cancel (a cancelled `Arc` item would leak its
 *   reference) and no alloc_workqueue; its `CondVar` sleeps only by
 *   releasing a lock guard, while the inflate lock must stay held across
 *   the wait (as Linux's tell_host); the stop flag is taken with interrupts
 *   off (the stats queue's callback queues work in interrupt context) and
 *   6.12 has no irq-safe `SpinLock`; it has no notifier abstraction and the
 *   bindings lack register_oom_notifier. The list head of the balloon pages
 *   lives here too (initialised before any Rust code runs for the device).
 * - the numbers of `enum freehint_work` and `enum freehint_cb` are those of
 *   `enum Work` and `enum Callback` in virtio.rs.
 */

#include <linux/build_bug.h>
#include <linux/jiffies.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/notifier.h>
#include <linux/oom.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/stddef.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_config.h>
#include <linux/vmstat.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "virtio_shim.h"

/* Layouts virtio.rs mirrors (checked there against the same figures). */
static_assert(sizeof(struct freehint_virtio_ops) == 6 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, validate) == 0 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, probe) == 1 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, remove) == 2 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, config_changed) == 3 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, work) == 4 * sizeof(void *));
static_assert(offsetof(struct freehint_virtio_ops, oom) == 5 * sizeof(void *));
static_assert(sizeof(struct freehint_buf) == 3 * sizeof(long));
static_assert(offsetof(struct freehint_buf, addr) == 0);
static_assert(offsetof(struct freehint_buf, pfn) == sizeof(long));
static_assert(offsetof(struct freehint_buf, len) == 2 * sizeof(long));

/* Work items, in the order of `enum Work` in virtio.rs. */
enum freehint_work {
	FREEHINT_WORK_SIZE = 0,
	FREEHINT_WORK_STATS = 1,
	FREEHINT_WORK_HINT = 2,
	FREEHINT_WORK_NR = 3,
};

/* Virtqueue callbacks, in the order of `enum Callback` in virtio.rs. */
enum freehint_cb {
	FREEHINT_CB_NONE = 0,
	FREEHINT_CB_ACK = 1,
	FREEHINT_CB_STATS = 2,
};

/* The most buffers one chain has (a header and its payload). */
#define FREEHINT_MAX_BUFS 2

static const struct freehint_virtio_ops *freehint_ops;

/* One per bound device, from probe until after the Rust state is gone. */
struct freehint_vb {
	struct virtio_device *vdev;
	/* Rust driver state; set by Rust before the device is made ready. */
	void *rust;
	struct work_struct work[FREEHINT_WORK_NR];
	/* Free page hinting runs on its own workqueue (as Linux). */
	struct workqueue_struct *hint_wq;
	/* Woken by every virtqueue callback that returns buffers. */
	wait_queue_head_t acked;
	/* Set once removal starts; no work is queued after that. */
	spinlock_t stop_lock;
	bool stop_update;
	/* The device was reset and its virtqueues deleted. */
	bool vqs_deleted;
	struct notifier_block oom_nb;
	/* Pages in the balloon, linked through page->lru (a Rust lock guards it). */
	struct list_head pages;
};

static struct freehint_vb *freehint_vb(const struct virtio_device *vdev)
{
	return vdev->priv;
}

/* ---- callbacks of the virtio core and the mm, forwarded to Rust ---- */

static void freehint_vq_ack(struct virtqueue *vq)
{
	wake_up(&freehint_vb(vq->vdev)->acked);
}

static bool freehint_queue_work_locked(struct freehint_vb *vb, unsigned int which)
{
	if (vb->stop_update || which >= FREEHINT_WORK_NR)
		return false;
	if (which == FREEHINT_WORK_HINT)
		return vb->hint_wq && queue_work(vb->hint_wq, &vb->work[which]);
	return queue_work(system_freezable_wq, &vb->work[which]);
}

static void freehint_vq_stats(struct virtqueue *vq)
{
	freehint_queue_work(vq->vdev, FREEHINT_WORK_STATS);
}

#define FREEHINT_WORK_FN(name, idx)					\
static void name(struct work_struct *work)				\
{									\
	struct freehint_vb *vb =					\
		container_of(work, struct freehint_vb, work[idx]);	\
	void *rust = READ_ONCE(vb->rust);				\
									\
	if (rust)							\
		freehint_ops->work(rust, idx);				\
}
FREEHINT_WORK_FN(freehint_size_work_fn, FREEHINT_WORK_SIZE)
FREEHINT_WORK_FN(freehint_stats_work_fn, FREEHINT_WORK_STATS)
FREEHINT_WORK_FN(freehint_hint_work_fn, FREEHINT_WORK_HINT)

static int freehint_oom_notify(struct notifier_block *nb, unsigned long dummy, void *parm)
{
	struct freehint_vb *vb = container_of(nb, struct freehint_vb, oom_nb);
	unsigned long *freed = parm;
	void *rust = READ_ONCE(vb->rust);

	if (rust)
		*freed += freehint_ops->oom(rust);
	return NOTIFY_OK;
}

static int freehint_validate(struct virtio_device *vdev)
{
	return freehint_ops->validate(vdev);
}

static int freehint_probe(struct virtio_device *vdev)
{
	struct freehint_vb *vb;
	int err;

	if (!vdev->config->get)
		return -EINVAL;
	vb = kzalloc(sizeof(*vb), GFP_KERNEL);
	if (!vb)
		return -ENOMEM;
	vb->vdev = vdev;
	INIT_WORK(&vb->work[FREEHINT_WORK_SIZE], freehint_size_work_fn);
	INIT_WORK(&vb->work[FREEHINT_WORK_STATS], freehint_stats_work_fn);
	INIT_WORK(&vb->work[FREEHINT_WORK_HINT], freehint_hint_work_fn);
	init_waitqueue_head(&vb->acked);
	spin_lock_init(&vb->stop_lock);
	INIT_LIST_HEAD(&vb->pages);
	vdev->priv = vb;
	err = freehint_ops->probe(vdev);
	if (err) {
		vdev->priv = NULL;
		kfree(vb);
	}
	return err;
}

static void freehint_remove(struct virtio_device *vdev)
{
	struct freehint_vb *vb = vdev->priv;

	/* Rust stops the work, resets the device and frees its state. */
	freehint_ops->remove(vdev, vb->rust);
	vdev->priv = NULL;
	kfree(vb);
}

static void freehint_config_changed(struct virtio_device *vdev)
{
	void *rust = READ_ONCE(freehint_vb(vdev)->rust);

	if (rust)
		freehint_ops->config_changed(rust);
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

/* ---- per-device objects, called from Rust ---- */

void freehint_set_drvdata(struct virtio_device *vdev, void *rust)
{
	WRITE_ONCE(freehint_vb(vdev)->rust, rust);
}

bool freehint_queue_work(struct virtio_device *vdev, unsigned int which)
{
	struct freehint_vb *vb = freehint_vb(vdev);
	unsigned long flags;
	bool queued;

	spin_lock_irqsave(&vb->stop_lock, flags);
	queued = freehint_queue_work_locked(vb, which);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
	return queued;
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

int freehint_alloc_hint_wq(struct virtio_device *vdev)
{
	struct freehint_vb *vb = freehint_vb(vdev);

	vb->hint_wq = alloc_workqueue("freehint-wq", FREEHINT_HINT_WQ_FLAGS, 0);
	return vb->hint_wq ? 0 : -ENOMEM;
}

/* Stops queueing, then waits for every work item (as virtballoon_remove). */
void freehint_stop_and_cancel(struct virtio_device *vdev)
{
	struct freehint_vb *vb = freehint_vb(vdev);

	spin_lock_irq(&vb->stop_lock);
	vb->stop_update = true;
	spin_unlock_irq(&vb->stop_lock);
	cancel_work_sync(&vb->work[FREEHINT_WORK_SIZE]);
	cancel_work_sync(&vb->work[FREEHINT_WORK_STATS]);
	cancel_work_sync(&vb->work[FREEHINT_WORK_HINT]);
	if (vb->hint_wq) {
		destroy_workqueue(vb->hint_wq);
		vb->hint_wq = NULL;
	}
}

int freehint_register_oom(struct virtio_device *vdev)
{
	struct freehint_vb *vb = freehint_vb(vdev);

	vb->oom_nb.notifier_call = freehint_oom_notify;
	vb->oom_nb.priority = 80; /* as VIRTIO_BALLOON_OOM_NOTIFY_PRIORITY */
	return register_oom_notifier(&vb->oom_nb);
}

void freehint_unregister_oom(struct virtio_device *vdev)
{
	unregister_oom_notifier(&freehint_vb(vdev)->oom_nb);
}

struct list_head *freehint_vdev_pages(struct virtio_device *vdev)
{
	return &freehint_vb(vdev)->pages;
}

/*
 * Sleeps until the device returns a buffer of @vq, at most @ms milliseconds
 * (UINT_MAX: no limit, as tell_host); NULL on timeout.
 */
void *freehint_vq_wait_buf(struct virtqueue *vq, unsigned int *len, unsigned int ms)
{
	long timeout = ms == UINT_MAX ? MAX_SCHEDULE_TIMEOUT : msecs_to_jiffies(ms);
	void *token = NULL;

	wait_event_timeout(freehint_vb(vq->vdev)->acked, (token = virtqueue_get_buf(vq, len)),
			   timeout);
	return token;
}

/* ---- one-line wrappers: features, config space, status ---- */

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

void freehint_reset_and_del_vqs(struct virtio_device *vdev)
{
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	WRITE_ONCE(freehint_vb(vdev)->vqs_deleted, true);
}

bool freehint_vqs_deleted(const struct virtio_device *vdev)
{
	return READ_ONCE(freehint_vb(vdev)->vqs_deleted);
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

bool freehint_vq_kick(struct virtqueue *vq)
{
	return virtqueue_kick(vq);
}

void *freehint_vq_get_buf(struct virtqueue *vq, unsigned int *len)
{
	return virtqueue_get_buf(vq, len);
}

unsigned int freehint_vq_num_free(const struct virtqueue *vq)
{
	return vq->num_free;
}

unsigned int freehint_vq_size(const struct virtqueue *vq)
{
	return virtqueue_get_vring_size(vq);
}

/* ---- one-line wrappers: balloon pages, poisoning, memory figures ---- */

void freehint_page_list_add(struct list_head *head, struct page *page)
{
	list_add(&page->lru, head);
}

struct page *freehint_page_list_pop(struct list_head *head)
{
	struct page *page = list_first_entry_or_null(head, struct page, lru);

	if (page)
		list_del(&page->lru);
	return page;
}

bool freehint_page_poisoning_enabled(void)
{
	return page_poisoning_enabled_static();
}

bool freehint_want_init_on_free(void)
{
	return want_init_on_free();
}

unsigned long freehint_file_pages(void)
{
	return global_node_page_state(NR_FILE_PAGES);
}

/*
 * The VM event counters the stats queue reports, in the order of mm.rs
 * (major faults, minor faults, pages swapped in, out, OOM kills); false
 * without CONFIG_VM_EVENT_COUNTERS.
 */
bool freehint_vm_events(u64 *out, unsigned int n)
{
#ifdef CONFIG_VM_EVENT_COUNTERS
	unsigned long events[NR_VM_EVENT_ITEMS];

	if (n != 5)
		return false;
	all_vm_events(events);
	out[0] = events[PGMAJFAULT];
	out[1] = events[PGFAULT];
	out[2] = events[PSWPIN];
	out[3] = events[PSWPOUT];
	out[4] = events[OOM_KILL];
	return true;
#else
	return false;
#endif
}
