/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Functions virtio_shim.c exports to the Rust side of freehint.ko (virtio.rs
 * declares them again in its `extern "C"` block, with the same types).
 */
#ifndef FREEHINT_VIRTIO_SHIM_H
#define FREEHINT_VIRTIO_SHIM_H

#include <linux/types.h>

struct freehint_vb;
struct freehint_mem_stats;
struct list_head;
struct page;
struct virtio_device;
struct virtqueue;

int freehint_virtio_register(void);
void freehint_virtio_unregister(void);
void freehint_vb_set_rust(struct freehint_vb *vb, void *rust);
bool freehint_queue_work(struct freehint_vb *vb, unsigned int which);
int freehint_alloc_hint_wq(struct freehint_vb *vb);
void freehint_stop_and_cancel(struct freehint_vb *vb);
int freehint_register_oom(struct freehint_vb *vb);
void freehint_unregister_oom(struct freehint_vb *vb);
bool freehint_has_feature(const struct virtio_device *vdev, unsigned int bit);
void freehint_clear_feature(struct virtio_device *vdev, unsigned int bit);
u32 freehint_cread_num_pages(struct virtio_device *vdev);
u32 freehint_cread_cmd_id(struct virtio_device *vdev);
void freehint_cwrite_actual(struct virtio_device *vdev, u32 v);
void freehint_cwrite_poison_val(struct virtio_device *vdev, u32 v);
void freehint_device_ready(struct virtio_device *vdev);
void freehint_reset_device(struct virtio_device *vdev);
void freehint_del_vqs(struct virtio_device *vdev);
int freehint_find_vqs(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[], const char *const names[], const u8 cbs[]);
int freehint_vq_add_outbuf(struct virtqueue *vq, const void *buf, unsigned int len, void *token);
int freehint_vq_add_out_in(struct virtqueue *vq, const void *out, unsigned int out_len, void *in, unsigned int in_len, void *token);
int freehint_vq_add_out2(struct virtqueue *vq, const void *a, unsigned int a_len, const void *b, unsigned int b_len, void *token);
int freehint_vq_add_inbuf_pfn(struct virtqueue *vq, unsigned long pfn, unsigned int len, void *token);
bool freehint_vq_kick(struct virtqueue *vq);
void *freehint_vq_get_buf(struct virtqueue *vq, unsigned int *len);
unsigned int freehint_vq_num_free(const struct virtqueue *vq);
unsigned int freehint_vq_size(const struct virtqueue *vq);
void *freehint_vq_wait_buf(struct freehint_vb *vb, struct virtqueue *vq, unsigned int *len);
void *freehint_vq_wait_buf_timeout(struct freehint_vb *vb, struct virtqueue *vq, unsigned int *len, unsigned int ms);
struct page *freehint_balloon_page_alloc(void);
void freehint_balloon_page_free(struct page *page);
struct list_head *freehint_vb_pages(struct freehint_vb *vb);
void freehint_page_list_add(struct list_head *head, struct page *page);
struct page *freehint_page_list_pop(struct list_head *head);
unsigned long freehint_vb_page_to_pfn(const struct page *page);
void freehint_adjust_managed_page_count(struct page *page, long count);
bool freehint_page_poisoning_enabled(void);
bool freehint_want_init_on_free(void);
void freehint_mem_stats(struct freehint_mem_stats *s);

#endif /* FREEHINT_VIRTIO_SHIM_H */
