#ifndef SYNOD_CORE_SNAPSHOT_FORMAT_H_
#define SYNOD_CORE_SNAPSHOT_FORMAT_H_

// The format of a snapshot image (StateMachine::Snapshot writes it in memory; the server's
// adapters/snapshot_image.h writes and reads it as a file, in pieces):
//
//   "SYNODSS1"
//   for each database, the system database first:
//     [u64 file id length][file id][u64 image length][the database's .sqlite3 image]
//   [u64 StableHash of every byte before it]
//
// Integers are little-endian. The image of a database may be in WAL or rollback mode
// (NormalizeImageHeader, core/sqlite_util.h, reads either).

#include <cstdint>
#include <string>
#include <string_view>

namespace synod {

inline constexpr std::string_view kSnapshotMagic = "SYNODSS1";
inline constexpr size_t kSnapshotU64Bytes = 8;
// File ids are short (a hash, or "system"); a frame naming a longer one is damage.
inline constexpr uint64_t kSnapshotMaxFileIdBytes = 64;

void AppendSnapshotU64(std::string* out, uint64_t value);
// Decodes the first kSnapshotU64Bytes bytes of `in`. REQUIRES: that many.
uint64_t DecodeSnapshotU64(std::string_view in);
// What precedes a database's image: its file id and the image's length.
std::string SnapshotFrameHeader(std::string_view file_id, uint64_t image_bytes);

}  // namespace synod

#endif  // SYNOD_CORE_SNAPSHOT_FORMAT_H_
