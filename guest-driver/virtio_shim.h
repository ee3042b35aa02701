/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Functions virtio_shim.c exports to the Rust side of freehint.ko. virtio.rs
 * and virtio/objects.rs declare them again in `extern "C"` blocks with the
 * same types; the two structures both sides know, struct freehint_virtio_ops
 * and struct freehint_buf, have their layouts checked at compile time on
 * both sides.
 */
#ifndef FREEHINT_VIRTIO_SHIM_H
#define FREEHINT_VIRTIO_SHIM_H

#include <linux/types.h>

struct virtio_device;
struct virtqueue;
struct wait_queue_head;
struct workqueue_struct;

/*
 * What the C callbacks call, implemented in Rust (virtio/driver.rs,
 * `Adapter<T>`; virtio/objects.rs). `objs` is the device's `priv` pointer.
 */
struct freehint_virtio_ops {
	int (*validate)(struct virtio_device *vdev);
	int (*probe)(struct virtio_device *vdev);
	void (*remove)(struct virtio_device *vdev);
	void (*config_changed)(void *objs);
	void (*vq_callback)(void *objs, unsigned int which);
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

/* Wrappers of static inlines, macros and config ops. */
void freehint_set_priv(struct virtio_device *vdev, void *objs);
void *freehint_priv(const struct virtio_device *vdev);
bool freehint_has_feature(const struct virtio_device *vdev, unsigned int bit);
void freehint_clear_feature(struct virtio_device *vdev, unsigned int bit);
u32 freehint_config_read_le32(struct virtio_device *vdev, unsigned int offset);
void freehint_config_write_le32(struct virtio_device *vdev, unsigned int offset, u32 v);
void freehint_device_ready(struct virtio_device *vdev);
void freehint_del_vqs(struct virtio_device *vdev);
int freehint_find_vqs(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[],
		      const char *const names[], const u8 cbs[]);
struct workqueue_struct *freehint_alloc_hint_wq(void);
int freehint_vq_add_bufs(struct virtqueue *vq, const struct freehint_buf *bufs, unsigned int out,
			 unsigned int in);
unsigned int freehint_vq_num_free(const struct virtqueue *vq);
void *freehint_vq_wait_buf(struct wait_queue_head *wq, struct virtqueue *vq, unsigned int *len,
			   unsigned int ms);

#endif /* FREEHINT_VIRTIO_SHIM_H */
