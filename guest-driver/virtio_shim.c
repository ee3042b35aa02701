// SPDX-License-Identifier: GPL-2.0
/*
 * freehint.ko as a virtio-balloon driver: the C side.
 *
 * What lives here is what Rust cannot express directly in 6.12 (there is no
 * virtio abstraction in the `kernel` crate yet): the `struct virtio_driver`
 * with its id and feature tables, the callbacks the virtio core and the mm
 * call (probe/remove/validate/config_changed, virtqueue callbacks, work
 * functions, the OOM notifier), each forwarding to a Rust `extern "C"` entry
 * point in virtio.rs; and one-line wrappers around static inlines and macros
 * (virtio_cread_le/virtio_cwrite_le, __virtio_test_bit, virtio_device_ready,
 * sg_init_one, wait_event_timeout, ...). Every decision (which features,
 * which queues, what to send, when to stop) is made in Rust (balloon.rs,
 * hint.rs); nothing here decides anything.
 *
 * One `struct freehint_vb` exists per bound device, from probe until after
 * the Rust state is gone in remove. It holds the C-only objects: work items,
 * the wait queue the virtqueue callbacks wake, the stop flag that keeps work
 * from being queued during removal, and the OOM notifier block.
 */

#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/jiffies.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/notifier.h>
#include <linux/oom.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/swap.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/vmstat.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "virtio_shim.h"

/* Work items, in the order of enum freehint_work in virtio.rs. */
enum freehint_work {
	FREEHINT_WORK_SIZE = 0,
	FREEHINT_WORK_STATS = 1,
	FREEHINT_WORK_HINT = 2,
	FREEHINT_WORK_NR = 3,
};

/* Virtqueue callbacks, in the order of enum Callback in virtio.rs. */
enum freehint_cb {
	FREEHINT_CB_NONE = 0,
	FREEHINT_CB_ACK = 1,
	FREEHINT_CB_STATS = 2,
};

struct freehint_vb {
	struct virtio_device *vdev;
	/* Rust driver state; set by Rust before the device is made ready. */
	void *rust;
	struct work_struct work[FREEHINT_WORK_NR];
	/* Free page hinting runs on its own (freezable, CPU-intensive) wq. */
	struct workqueue_struct *hint_wq;
	/* Woken by every virtqueue callback that returns buffers. */
	wait_queue_head_t acked;
	/* Set once removal starts; no work is queued after that. */
	spinlock_t stop_lock;
	bool stop_update;
	struct notifier_block oom_nb;
	/* Pages in the balloon, linked through page->lru (Rust's lock guards it). */
	struct list_head pages;
};

/* Rust entry points (virtio.rs). */
int freehint_rs_validate(struct virtio_device *vdev);
int freehint_rs_probe(struct freehint_vb *vb, struct virtio_device *vdev);
void freehint_rs_remove(void *rust);
void freehint_rs_config_changed(void *rust);
void freehint_rs_size_work(void *rust);
void freehint_rs_stats_work(void *rust);
void freehint_rs_hint_work(void *rust);
unsigned long freehint_rs_oom(void *rust);

/* ---- callbacks from the virtio core and the mm, forwarded to Rust ---- */

static void freehint_vq_ack(struct virtqueue *vq)
{
	struct freehint_vb *vb = vq->vdev->priv;

	wake_up(&vb->acked);
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
	struct freehint_vb *vb = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	freehint_queue_work_locked(vb, FREEHINT_WORK_STATS);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
}

#define FREEHINT_WORK_FN(name, idx, rust_fn)				\
static void name(struct work_struct *work)				\
{									\
	struct freehint_vb *vb =					\
		container_of(work, struct freehint_vb, work[idx]);	\
	void *rust = READ_ONCE(vb->rust);				\
									\
	if (rust)							\
		rust_fn(rust);						\
}
FREEHINT_WORK_FN(freehint_size_work_fn, FREEHINT_WORK_SIZE, freehint_rs_size_work)
FREEHINT_WORK_FN(freehint_stats_work_fn, FREEHINT_WORK_STATS, freehint_rs_stats_work)
FREEHINT_WORK_FN(freehint_hint_work_fn, FREEHINT_WORK_HINT, freehint_rs_hint_work)

static int freehint_oom_notify(struct notifier_block *nb, unsigned long dummy, void *parm)
{
	struct freehint_vb *vb = container_of(nb, struct freehint_vb, oom_nb);
	unsigned long *freed = parm;
	void *rust = READ_ONCE(vb->rust);

	if (rust)
		*freed += freehint_rs_oom(rust);
	return NOTIFY_OK;
}

static int freehint_validate(struct virtio_device *vdev)
{
	return freehint_rs_validate(vdev);
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
	err = freehint_rs_probe(vb, vdev);
	if (err) {
		vdev->priv = NULL;
		kfree(vb);
	}
	return err;
}

static void freehint_remove(struct virtio_device *vdev)
{
	struct freehint_vb *vb = vdev->priv;

	/* Rust stops and cancels the work, resets the device, frees its state. */
	freehint_rs_remove(vb->rust);
	vdev->priv = NULL;
	kfree(vb);
}

static void freehint_config_changed(struct virtio_device *vdev)
{
	struct freehint_vb *vb = vdev->priv;
	void *rust = READ_ONCE(vb->rust);

	if (rust)
		freehint_rs_config_changed(rust);
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

/* freehint's bitmap hint extension (protocol/src/balloon.rs, docs/protocol.md). */
#define FREEHINT_F_FREE_PAGE_BITMAP 23

/*
 * Offered features. VIRTIO_BALLOON_F_REPORTING is not offered (free page
 * reporting is not implemented).
 */
static unsigned int freehint_features[] = {
	VIRTIO_BALLOON_F_MUST_TELL_HOST,
	VIRTIO_BALLOON_F_STATS_VQ,
	VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
	VIRTIO_BALLOON_F_FREE_PAGE_HINT,
	VIRTIO_BALLOON_F_PAGE_POISON,
	FREEHINT_F_FREE_PAGE_BITMAP,
};

static struct virtio_driver freehint_virtio_driver = {
	.feature_table = freehint_features,
	.feature_table_size = ARRAY_SIZE(freehint_features),
	.driver.name = KBUILD_MODNAME,
	.id_table = freehint_id_table,
	.validate = freehint_validate,
	.probe = freehint_probe,
	.remove = freehint_remove,
	.config_changed = freehint_config_changed,
};

/* ---- driver registration (module init/exit) ---- */

int freehint_virtio_register(void)
{
	return register_virtio_driver(&freehint_virtio_driver);
}

void freehint_virtio_unregister(void)
{
	unregister_virtio_driver(&freehint_virtio_driver);
}

/* ---- per-device plumbing, called from Rust ---- */

void freehint_vb_set_rust(struct freehint_vb *vb, void *rust)
{
	WRITE_ONCE(vb->rust, rust);
}

bool freehint_queue_work(struct freehint_vb *vb, unsigned int which)
{
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

int freehint_alloc_hint_wq(struct freehint_vb *vb)
{
	vb->hint_wq = alloc_workqueue("freehint-wq", FREEHINT_HINT_WQ_FLAGS, 0);
	return vb->hint_wq ? 0 : -ENOMEM;
}

/* Stops queueing, then waits for every work item (as virtballoon_remove). */
void freehint_stop_and_cancel(struct freehint_vb *vb)
{
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

int freehint_register_oom(struct freehint_vb *vb)
{
	vb->oom_nb.notifier_call = freehint_oom_notify;
	vb->oom_nb.priority = 80; /* as VIRTIO_BALLOON_OOM_NOTIFY_PRIORITY */
	return register_oom_notifier(&vb->oom_nb);
}

void freehint_unregister_oom(struct freehint_vb *vb)
{
	unregister_oom_notifier(&vb->oom_nb);
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

/* Legacy balloon config space is little-endian, unlike all other devices. */
u32 freehint_cread_num_pages(struct virtio_device *vdev)
{
	u32 v;

	virtio_cread_le(vdev, struct virtio_balloon_config, num_pages, &v);
	return v;
}

u32 freehint_cread_cmd_id(struct virtio_device *vdev)
{
	u32 v;

	virtio_cread_le(vdev, struct virtio_balloon_config, free_page_hint_cmd_id, &v);
	return v;
}

void freehint_cwrite_actual(struct virtio_device *vdev, u32 v)
{
	virtio_cwrite_le(vdev, struct virtio_balloon_config, actual, &v);
}

void freehint_cwrite_poison_val(struct virtio_device *vdev, u32 v)
{
	virtio_cwrite_le(vdev, struct virtio_balloon_config, poison_val, &v);
}

void freehint_device_ready(struct virtio_device *vdev)
{
	virtio_device_ready(vdev);
}

void freehint_reset_device(struct virtio_device *vdev)
{
	virtio_reset_device(vdev);
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

/* ---- one-line wrappers: virtqueues ---- */

int freehint_vq_add_outbuf(struct virtqueue *vq, const void *buf, unsigned int len, void *token)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, len);
	return virtqueue_add_outbuf(vq, &sg, 1, token, GFP_KERNEL);
}

/* One chain: a device-readable buffer, then a device-writable one. */
int freehint_vq_add_out_in(struct virtqueue *vq, const void *out, unsigned int out_len,
			   void *in, unsigned int in_len, void *token)
{
	struct scatterlist o, i, *sgs[2] = { &o, &i };

	sg_init_one(&o, out, out_len);
	sg_init_one(&i, in, in_len);
	return virtqueue_add_sgs(vq, sgs, 1, 1, token, GFP_KERNEL);
}

/* One chain of two device-readable buffers (a header and its payload). */
int freehint_vq_add_out2(struct virtqueue *vq, const void *a, unsigned int a_len,
			 const void *b, unsigned int b_len, void *token)
{
	struct scatterlist sa, sb, *sgs[2] = { &sa, &sb };

	sg_init_one(&sa, a, a_len);
	sg_init_one(&sb, b, b_len);
	return virtqueue_add_sgs(vq, sgs, 2, 0, token, GFP_KERNEL);
}

/* A device-writable buffer describing [pfn << PAGE_SHIFT, + len): a free block. */
int freehint_vq_add_inbuf_pfn(struct virtqueue *vq, unsigned long pfn, unsigned int len,
			      void *token)
{
	struct scatterlist sg;

	if (!pfn_valid(pfn))
		return -EINVAL;
	sg_init_table(&sg, 1);
	sg_set_page(&sg, pfn_to_page(pfn), len, 0);
	return virtqueue_add_inbuf(vq, &sg, 1, token, GFP_KERNEL);
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

/* Sleeps until the device returns a buffer of @vq (as tell_host). */
void *freehint_vq_wait_buf(struct freehint_vb *vb, struct virtqueue *vq, unsigned int *len)
{
	void *token;

	wait_event(vb->acked, (token = virtqueue_get_buf(vq, len)));
	return token;
}

/* As above, at most @ms milliseconds; NULL on timeout. */
void *freehint_vq_wait_buf_timeout(struct freehint_vb *vb, struct virtqueue *vq,
				   unsigned int *len, unsigned int ms)
{
	void *token = NULL;

	wait_event_timeout(vb->acked, (token = virtqueue_get_buf(vq, len)),
			   msecs_to_jiffies(ms));
	return token;
}

/* ---- one-line wrappers: pages, poisoning, memory statistics ---- */

/*
 * Balloon pages: not GFP_HIGHUSER_MOVABLE, because this driver does not
 * register a balloon_dev_info migration callback, so compaction could not
 * move them; unmovable allocations must stay out of movable pageblocks.
 */
struct page *freehint_balloon_page_alloc(void)
{
	return alloc_page(GFP_HIGHUSER | __GFP_NOMEMALLOC | __GFP_NORETRY | __GFP_NOWARN);
}

void freehint_balloon_page_free(struct page *page)
{
	__free_page(page);
}

struct list_head *freehint_vb_pages(struct freehint_vb *vb)
{
	return &vb->pages;
}

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

unsigned long freehint_vb_page_to_pfn(const struct page *page)
{
	return page_to_pfn(page);
}

void freehint_adjust_managed_page_count(struct page *page, long count)
{
	adjust_managed_page_count(page, count);
}

bool freehint_page_poisoning_enabled(void)
{
	return page_poisoning_enabled_static();
}

bool freehint_want_init_on_free(void)
{
	return want_init_on_free();
}

/* Mirrors struct MemStats in virtio.rs. */
struct freehint_mem_stats {
	u64 free_bytes;
	u64 total_bytes;
	u64 avail_bytes;
	u64 caches_bytes;
	u64 major_faults;
	u64 minor_faults;
	u64 swap_in_bytes;
	u64 swap_out_bytes;
	u64 oom_kills;
	u8 have_events;
};

void freehint_mem_stats(struct freehint_mem_stats *s)
{
	struct sysinfo i;
#ifdef CONFIG_VM_EVENT_COUNTERS
	unsigned long events[NR_VM_EVENT_ITEMS];
#endif

	si_meminfo(&i);
	s->free_bytes = (u64)i.freeram << PAGE_SHIFT;
	s->total_bytes = (u64)i.totalram << PAGE_SHIFT;
	s->avail_bytes = (u64)si_mem_available() << PAGE_SHIFT;
	s->caches_bytes = (u64)global_node_page_state(NR_FILE_PAGES) << PAGE_SHIFT;
#ifdef CONFIG_VM_EVENT_COUNTERS
	all_vm_events(events);
	s->major_faults = events[PGMAJFAULT];
	s->minor_faults = events[PGFAULT];
	s->swap_in_bytes = (u64)events[PSWPIN] << PAGE_SHIFT;
	s->swap_out_bytes = (u64)events[PSWPOUT] << PAGE_SHIFT;
	s->oom_kills = events[OOM_KILL];
	s->have_events = 1;
#else
	s->have_events = 0;
#endif
}
