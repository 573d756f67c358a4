// A stand-in for libcudart's cudaLaunchHostFunc, for testing kt's CUDA-stream ordering on machines without
// a GPU (cuda_stream_test loads it through KT_CUDART). Each stream handle gets a worker thread that runs
// what was launched on it in order, like a CUDA stream runs its host nodes after the work before them;
// fake_cuda_launch_sleep stands for GPU work of a given length, fake_cuda_stream_synchronize for
// cudaStreamSynchronize. Stream 0xbad fails every launch with error 400 (cudaErrorInvalidResourceHandle).
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

namespace {

class FakeStream {
 public:
  FakeStream() : thread_([this] { Loop(); }) {}
  ~FakeStream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Launch(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ops_.push_back(std::move(op));
      ++launched_;
    }
    cv_.notify_all();
  }
  void Synchronize() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned long target = launched_;
    cv_.wait(lock, [&] { return done_ >= target; });
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !ops_.empty(); });
      if (ops_.empty()) return;
      std::function<void()> op = std::move(ops_.front());
      ops_.pop_front();
      lock.unlock();
      op();
      lock.lock();
      ++done_;
      cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> ops_;
  unsigned long launched_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

std::mutex g_mu;
std::map<void*, std::unique_ptr<FakeStream>>& Streams() {
  static auto* streams = new std::map<void*, std::unique_ptr<FakeStream>>;
  return *streams;
}
FakeStream& Stream(void* handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::unique_ptr<FakeStream>& s = Streams()[handle];
  if (s == nullptr) s = std::make_unique<FakeStream>();
  return *s;
}
constexpr int kInvalidResourceHandle = 400;
void* const kBadStream = reinterpret_cast<void*>(0xbad);

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int cudaLaunchHostFunc(void* stream, void (*fn)(void*), void* data) {
  if (stream == kBadStream) return kInvalidResourceHandle;
  Stream(stream).Launch([fn, data] { fn(data); });
  return 0;
}

__attribute__((visibility("default"))) const char* cudaGetErrorString(int error) {
  return error == kInvalidResourceHandle ? "invalid resource handle" : "unknown error";
}

__attribute__((visibility("default"))) void fake_cuda_launch_sleep(void* stream, int micros) {
  Stream(stream).Launch([micros] { std::this_thread::sleep_for(std::chrono::microseconds(micros)); });
}

__attribute__((visibility("default"))) void fake_cuda_stream_synchronize(void* stream) {
  Stream(stream).Synchronize();
}

}  // extern "C"
