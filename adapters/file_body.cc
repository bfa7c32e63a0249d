#include "adapters/file_body.h"

#include <unistd.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace synod {

struct FileBodySource::ReadOp {
  uv_fs_t request;
  std::shared_ptr<FileBodySource> source;  // keeps the file open while the read runs
  std::string buffer;
  ReadDone done;
};

std::shared_ptr<FileBodySource> FileBodySource::Create(uv_loop_t* loop, int fd, uint64_t offset,
                                                       uint64_t length,
                                                       std::shared_ptr<void> hold) {
  return std::shared_ptr<FileBodySource>(
      new FileBodySource(loop, fd, offset, length, std::move(hold)));
}

FileBodySource::FileBodySource(uv_loop_t* loop, int fd, uint64_t offset, uint64_t length,
                               std::shared_ptr<void> hold)
    : loop_(loop),
      fd_(fd),
      end_(offset + length),
      length_(length),
      position_(offset),
      hold_(std::move(hold)) {}

void CloseOnPool(uv_loop_t* loop, int fd) {
  auto* request = new uv_fs_t;
  if (uv_fs_close(loop, request, fd, [](uv_fs_t* done) {
        uv_fs_req_cleanup(done);
        delete done;
      }) != 0) {
    delete request;
    close(fd);
  }
}

FileBodySource::~FileBodySource() { CloseOnPool(loop_, fd_); }

void FileBodySource::Read(size_t max_bytes, ReadDone done) {
  const uint64_t want = std::min<uint64_t>(max_bytes, end_ - position_);
  if (want == 0) {
    done(absl::OutOfRangeError("read past the end of the body"));
    return;
  }
  auto op = std::make_unique<ReadOp>();
  op->request.data = op.get();
  op->source = shared_from_this();
  op->buffer.resize(static_cast<size_t>(want));
  op->done = std::move(done);
  uv_buf_t buf = uv_buf_init(op->buffer.data(), static_cast<unsigned>(op->buffer.size()));
  const int rc = uv_fs_read(loop_, &op->request, fd_, &buf, 1, static_cast<int64_t>(position_),
                            &FileBodySource::OnRead);
  if (rc < 0) {
    ReadDone failed = std::move(op->done);
    failed(absl::UnavailableError(absl::StrCat("cannot read the body's file: ", uv_strerror(rc))));
    return;
  }
  op.release();  // OnRead owns it now
}

void FileBodySource::OnRead(uv_fs_t* request) {
  std::unique_ptr<ReadOp> op(static_cast<ReadOp*>(request->data));
  const ssize_t result = request->result;
  uv_fs_req_cleanup(request);
  if (result < 0) {
    op->done(absl::UnavailableError(
        absl::StrCat("cannot read the body's file: ", uv_strerror(static_cast<int>(result)))));
    return;
  }
  if (result == 0) {
    op->done(absl::DataLossError("the body's file ended early"));
    return;
  }
  op->buffer.resize(static_cast<size_t>(result));
  op->source->position_ += static_cast<uint64_t>(result);
  op->done(std::move(op->buffer));
}

}  // namespace synod
