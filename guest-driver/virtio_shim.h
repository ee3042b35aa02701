/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Functions virtio_shim.c exports to the Rust side of freehint.ko. virtio.rs
 * and mm.rs declare them again in their `extern "C"` blocks with the same
 * types; the one structure both sides know, struct freehint_virtio_ops, has
 * its layout checked at compile time on both sides.
 */
#ifndef FREEHINT_VIRTIO_SHIM_H
#define FREEHINT_VIRTIO_SHIM_H

#include <linux/types.h>

struct list_head;
struct page;
struct virtio_device;
struct virtqueue;

/*
 * The driver's callbacks, implemented in Rust (virtio.rs, `Adapter<T>`).
 * `rust` is the driver state set with freehint_set_drvdata().
 */
struct freehint_virtio_ops {
	int (*validate)(struct virtio_device *vdev);
	int (*probe)(struct virtio_device *vdev);
	void (*remove)(struct virtio_device *vdev, void *rust);
	void (*config_changed)(void *rust);
	void (*work)(void *rust, unsigned int which);
	unsigned long (*oom)(void *rust);
};

/* One buffer of a chain: driver memory at @addr, or guest memory at @pfn. */
struct freehint_buf {
	const void *addr;
	unsigned long pfn;
	unsigned long len;
};

/* Driver registration. */
int freehint_virtio_register(const struct freehint_virtio_ops *ops, const unsigned int *features,
			     unsigned int nr_features);
void freehint_virtio_unregister(void);

/* Per-device objects that stay in C (see virtio_shim.c for why). */
void freehint_set_drvdata(struct virtio_device *vdev, void *rust);
bool freehint_queue_work(struct virtio_device *vdev, unsigned int which);
int freehint_alloc_hint_wq(struct virtio_device *vdev);
void freehint_stop_and_cancel(struct virtio_device *vdev);
int freehint_register_oom(struct virtio_device *vdev);
void freehint_unregister_oom(struct virtio_device *vdev);
struct list_head *freehint_vdev_pages(struct virtio_device *vdev);
void *freehint_vq_wait_buf(struct virtqueue *vq, unsigned int *len, unsigned int ms);

/* One-line wrappers of static inlines, macros and config ops. */
bool freehint_has_feature(const struct virtio_device *vdev, unsigned int bit);
void freehint_clear_feature(struct virtio_device *vdev, unsigned int bit);
u32 freehint_config_read_le32(struct virtio_device *vdev, unsigned int offset);
void freehint_config_write_le32(struct virtio_device *vdev, unsigned int offset, u32 v);
void freehint_device_ready(struct virtio_device *vdev);
void freehint_reset_and_del_vqs(struct virtio_device *vdev);
bool freehint_vqs_deleted(const struct virtio_device *vdev);
int freehint_find_vqs(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[],
		      const char *const names[], const u8 cbs[]);
int freehint_vq_add_bufs(struct virtqueue *vq, const struct freehint_buf *bufs, unsigned int out,
			 unsigned int in);
bool freehint_vq_kick(struct virtqueue *vq);
void *freehint_vq_get_buf(struct virtqueue *vq, unsigned int *len);
unsigned int freehint_vq_num_free(const struct virtqueue *vq);
unsigned int freehint_vq_size(const struct virtqueue *vq);

/* mm.rs: balloon page list, poisoning, the figures bindings lack. */
void freehint_page_list_add(struct list_head *head, struct page *page);
struct page *freehint_page_list_pop(struct list_head *head);
bool freehint_page_poisoning_enabled(void);
bool freehint_want_init_on_free(void);
unsigned long freehint_file_pages(void);
bool freehint_vm_events(u64 *out, unsigned int n);

#endif /* FREEHINT_VIRTIO_SHIM_H */
