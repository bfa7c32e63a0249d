#ifndef SYNOD_ADAPTERS_FILE_BODY_H_
#define SYNOD_ADAPTERS_FILE_BODY_H_

// A streamed HTTP response body (adapters/http_server.h HttpBodySource) read from an open
// file. Each piece is read on libuv's thread pool, so the loop never waits for the disk, and
// memory holds one piece at a time whatever the file's size.

#include <uv.h>

#include <cstdint>
#include <memory>

#include "adapters/http_server.h"

namespace synod {

// Closes `fd` on libuv's pool. Closing the last descriptor of an unlinked file frees its
// blocks, which takes ext4 a while for a large file: the loop must not wait for it.
void CloseOnPool(uv_loop_t* loop, int fd);

class FileBodySource : public HttpBodySource, public std::enable_shared_from_this<FileBodySource> {
 public:
  // Serves bytes [offset, offset + length) of the file open as `fd`, which the source owns
  // (closed on libuv's pool once the source and any read under way are gone: the last close
  // of an unlinked file frees its blocks, which the loop must not wait for). `hold` lives as long
  // as the source: the caller's token for a resource the body uses (a slot it counts, say).
  // REQUIRES: `loop` outlives the source.
  static std::shared_ptr<FileBodySource> Create(uv_loop_t* loop, int fd, uint64_t offset,
                                                uint64_t length,
                                                std::shared_ptr<void> hold = nullptr);
  ~FileBodySource() override;
  FileBodySource(const FileBodySource&) = delete;
  FileBodySource& operator=(const FileBodySource&) = delete;

  uint64_t size() const override { return length_; }
  // A read under way keeps the source (and its file) alive until `done` has run.
  void Read(size_t max_bytes, ReadDone done) override;

 private:
  FileBodySource(uv_loop_t* loop, int fd, uint64_t offset, uint64_t length,
                 std::shared_ptr<void> hold);
  struct ReadOp;
  static void OnRead(uv_fs_t* request);

  uv_loop_t* const loop_;
  const int fd_;
  const uint64_t end_;  // one past the last byte served
  const uint64_t length_;
  uint64_t position_;  // the next byte to read
  std::shared_ptr<void> hold_;
};

}  // namespace synod

#endif  // SYNOD_ADAPTERS_FILE_BODY_H_
